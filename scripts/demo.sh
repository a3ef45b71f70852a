#!/usr/bin/env bash
# `make demo`: the main job for real — examples/hello.json runs in a fresh, sandboxed VM booted
# from the minimal test image, and its output (kernel, CPUs, memory, as the guest sees them)
# is printed. The examples name images under /usr/share/taskvm/images/; the demo points them at
# the test images this checkout built (test-images/out/) instead of installing anything.
set -euo pipefail
cd "$(dirname "$0")/.."
taskvm=${CARGO_TARGET_DIR:-target}/release/taskvm
work=target/demo
mkdir -p "$work"

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: taskvm needs root to jail each VM (a user of its own, its own mount and network namespaces); run 'sudo make demo'" >&2
  exit 1
fi

images="file://$PWD/test-images/out/"
sed "s#file:///usr/share/taskvm/images/#$images#" examples/hello.json > "$work/hello.json"

echo "== taskvm run examples/hello.json (image: test-images/out/minimal.tar.zst)"
status=0
"$taskvm" run "$work/hello.json" --cache "$work/cache" --state "$work/state" \
  --artifacts "$work/artifacts" || status=$?
echo "== exit status $status (0 completed, 1 failed, 2 malformed payload, 3 internal error)"
echo "== artifacts: $(cd "$work/artifacts" && ls | tr '\n' ' ')in $work/artifacts"
exit "$status"
