#!/usr/bin/env bash
# `make demo`: what taskvm can do today, for real. Booting a task VM arrives with issues 6-9;
# until then this validates the example payloads and shows how a bad one is reported.
set -euo pipefail
cd "$(dirname "$0")/.."
taskvm=target/release/taskvm

echo "== taskvm $($taskvm --version | cut -d' ' -f2): booting task VMs is not implemented yet (issues 6-9)."
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
