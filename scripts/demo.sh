#!/usr/bin/env bash
# `make demo`: what taskvm can do today, for real. Running a task in a VM arrives with issues
# 7-9; until then this caches the test image and validates the example payloads.
set -euo pipefail
cd "$(dirname "$0")/.."
taskvm=target/release/taskvm

echo "== taskvm $($taskvm --version | cut -d' ' -f2): running tasks in VMs is not implemented yet (issues 7-9)."
echo "== The test image, fetched into a demo cache (target/demo-cache):"
$taskvm image fetch test-images/out/minimal.tar.zst --cache target/demo-cache
$taskvm image ls --cache target/demo-cache
echo "== Validating examples/*.json against the payload schema and the default MachineLimits:"
for payload in examples/*.json; do
  printf '%s: ' "$payload"
  if output=$($taskvm validate "$payload"); then
    echo "$output"
  else
    echo "refused (exit $?):"
    echo "$output" | sed 's/^/    /'
  fi
done
