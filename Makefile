# taskvm — see README.md. Every target that needs system packages runs `deps` first.

CARGO ?= cargo
## Where cargo puts what it builds: $CARGO_TARGET_DIR when the user's shell sets it.
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
NEXTEST := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo yes)
## What runs the tests: cargo-nextest when installed, else cargo's own test runner.
TEST_RUNNER := $(if $(NEXTEST),nextest run,test)

.PHONY: all deps build packer agent test test-build test-build-cpu test-tools lint fmt-check fmt schemas demo bench test-images test-images-debian clean

all: build

## Install the system packages taskvm needs (apt, as root; skipped when present), and the
## web UI's terminal, xterm.js (npm, pinned, into the checkout).
deps:
	@bash scripts/deps.sh
	@bash scripts/ui-assets.sh

## Build the taskvm binary (release).
build:
	$(CARGO) build --release --locked --bin taskvm

## The taskvm that packs the test images: the release binary (`make test-images`, `make demo`),
## or the debug one for `make test`, which then builds no release profile at all. Packing is
## deterministic, so both give the same images.
PACKER ?= release
PACKER_BIN := $(TARGET_DIR)/$(PACKER)/taskvm
packer:
ifeq ($(PACKER),debug)
	$(CARGO) build --locked --bin taskvm
else
	$(CARGO) build --release --locked --bin taskvm
endif

## Tools only the tests use, kept in the checkout: playwright-core (npm), schemathesis (PyPI).
test-tools: deps
	@bash scripts/test-tools.sh

## fmt check, clippy with -D warnings, and the whole test suite (which boots the test image).
## The local Taskcluster deployment comes up while `test-build` compiles.
test: deps
	bash scripts/with-tc-local.sh --meanwhile '$(MAKE) --no-print-directory test-build' \
	  $(LINTING_CARGO) $(TEST_RUNNER) --workspace --locked --no-fail-fast

## `make test` lints while it compiles: clippy-driver is the compiler of the workspace's own
## crates (what `cargo clippy` does, in check mode, under the hood), so the dependencies are
## compiled once, for the tests, and not a second time in check mode for a separate
## `cargo clippy`. Every cargo call of `make test` has the same settings, so nothing is
## rebuilt in between. `make lint` is the stand-alone `cargo clippy`.
CLIPPY_DRIVER := $(shell command -v clippy-driver)
LINTING_CARGO := env RUSTC_WORKSPACE_WRAPPER=$(CLIPPY_DRIVER) CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__ $(CARGO)

## Everything `make test` needs before the tests run: the lint, the test tools, the images and
## the test binaries. The Debian image (debootstrap) and the test tools (npm, pip) are mostly
## disk and network: they are made in the background while the workspace compiles, and their
## output follows once all is done.
test-build: deps
	@mkdir -p $(TARGET_DIR)
	@$(MAKE) --no-print-directory $(DEBIAN_IMAGE) > $(TARGET_DIR)/test-images-debian.log 2>&1 & debian=$$!; \
	  $(MAKE) --no-print-directory test-tools > $(TARGET_DIR)/test-tools.log 2>&1 & tools=$$!; \
	  $(MAKE) --no-print-directory test-build-cpu; built=$$?; \
	  wait $$debian; made=$$?; wait $$tools; got=$$?; \
	  cat $(TARGET_DIR)/test-images-debian.log $(TARGET_DIR)/test-tools.log; \
	  [ $$built -eq 0 ] && [ $$made -eq 0 ] && [ $$got -eq 0 ]
test-build-cpu: fmt-check
	@test -n "$(CLIPPY_DRIVER)" || { echo "clippy-driver not found: rustup component add clippy" >&2; exit 1; }
	@$(MAKE) --no-print-directory agent CARGO="$(LINTING_CARGO)" > $(TARGET_DIR)/agent.log 2>&1 & agent=$$!; \
	  $(LINTING_CARGO) $(TEST_RUNNER) --workspace --locked --no-run; built=$$?; \
	  wait $$agent; made=$$?; cat $(TARGET_DIR)/agent.log; \
	  [ $$built -eq 0 ] && [ $$made -eq 0 ]
	@# The test build made target/debug/taskvm: it packs the images (a `cargo build --bin`
	@# now would build it again, with the dependencies' features of the binary alone).
	@$(MAKE) --no-print-directory $(TEST_IMAGE) PACKER=debug
	$(LINTING_CARGO) build --workspace --locked --bench '*'

fmt-check:
	$(CARGO) fmt --all -- --check

lint: fmt-check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

## Rewrite schemas/json/*.schema.json from the types.
schemas:
	TASKVM_UPDATE_SCHEMAS=1 $(CARGO) test --locked -p taskvm-schemas --test schema_files

## The main job for real: examples/hello.json in a VM booted from the minimal test image.
demo: deps build test-images
	@bash scripts/demo.sh

## Benchmarks print ratios against a baseline measured in the same run.
bench: deps test-images
	$(CARGO) bench --locked -p taskvm-image-manager --bench fetch
	$(CARGO) bench --locked -p taskvm --bench boot
	$(CARGO) bench --locked -p taskvm --bench run
	$(CARGO) bench --locked -p taskvm --bench mounts
	$(CARGO) bench --locked -p taskvm --bench debug
	$(CARGO) bench --locked -p taskvm --bench serve
	$(CARGO) bench --locked -p taskvm --bench build
	bash scripts/with-tc-local.sh $(CARGO) bench --locked -p taskvm --bench fleet
	$(CARGO) bench --locked -p taskvm-engine --bench vm
	$(CARGO) bench --locked -p taskvm-engine --bench memory

## The guest agent, static (glibc with crt-static), in its own target dir.
AGENT := $(TARGET_DIR)/guest/x86_64-unknown-linux-gnu/release/taskvm-agent
agent:
	CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
	  $(CARGO) build --release --locked -p taskvm-guest-agent --target x86_64-unknown-linux-gnu --target-dir $(TARGET_DIR)/guest

## Test images from pinned Debian packages; rebuilt only when an input changed.
TEST_IMAGE := test-images/out/minimal.tar.zst
test-images: deps packer agent
	@$(MAKE) --no-print-directory $(TEST_IMAGE)

$(TEST_IMAGE): test-images/build.sh test-images/packages.lock $(PACKER_BIN) $(AGENT)
	test-images/build.sh $(PACKER_BIN) $(AGENT) test-images/out

## A stock Debian with cloud-init and no taskvm agent (debootstrap; about 2 minutes, once).
DEBIAN_IMAGE := test-images/out/debian-cloud/machine.json
test-images-debian: deps
	@$(MAKE) --no-print-directory $(DEBIAN_IMAGE)

$(DEBIAN_IMAGE): test-images/debian-cloud.sh
	test-images/debian-cloud.sh test-images/out

clean:
	$(CARGO) clean
