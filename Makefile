# taskvm — see README.md. Every target that needs system packages runs `deps` first.

CARGO ?= cargo
NEXTEST := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo yes)

.PHONY: all deps build test lint fmt schemas demo bench test-images clean

all: build

## Install the system packages taskvm needs (apt, as root; skipped when present).
deps:
	@bash scripts/deps.sh

## Build the taskvm binary (release).
build:
	$(CARGO) build --release --locked --bin taskvm

## fmt check, clippy with -D warnings, and the whole test suite.
test: deps lint
ifeq ($(NEXTEST),yes)
	$(CARGO) nextest run --workspace --locked --no-fail-fast
else
	$(CARGO) test --workspace --locked --no-fail-fast
endif

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

## Rewrite schemas/json/*.schema.json from the types.
schemas:
	TASKVM_UPDATE_SCHEMAS=1 $(CARGO) test --locked -p taskvm-schemas --test schema_files

## The main job for real. Until the engine lands (issues 6-9) it validates the example
## payloads instead of booting one; it says so.
demo: deps build
	@bash scripts/demo.sh

## Benchmarks print ratios against a baseline measured in the same run.
bench: deps
	$(CARGO) bench --locked -p taskvm-image-manager --bench fetch

## Test images from Debian packages (issue 6).
test-images:
	@echo "test-images: not built yet; arrives with issue 6." >&2; exit 1

clean:
	$(CARGO) clean
