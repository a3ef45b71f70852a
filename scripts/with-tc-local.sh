#!/usr/bin/env bash
# Runs a command with the local Taskcluster deployment up (../shared/taskcluster/tc-local), for the
# `taskvm worker` integration tests: `tc-local up` with claims that expire after 15 s (so that
# claim expiry is tested in seconds), the command with the deployment's variables, then
# `tc-local down` whatever the command's outcome. Set TC_LOCAL to the script's path if it is
# elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
tc_local=${TC_LOCAL:-../shared/taskcluster/tc-local}
if [ ! -x "$tc_local" ]; then
  echo "with-tc-local: $tc_local is missing; set TC_LOCAL to the tc-local script" >&2
  exit 1
fi
"$tc_local" install
export TASK_CLAIM_TIMEOUT=${TASK_CLAIM_TIMEOUT:-15}
# A deployment left up (or half up) by an earlier run is replaced: the tests want a fresh one.
"$tc_local" down >/dev/null 2>&1 || true
"$tc_local" up >/dev/null
trap '"$tc_local" down >/dev/null 2>&1 || true' EXIT
export TC_LOCAL_ENV="${TC_RUN:-/tmp/tc-local}/env.sh"
# shellcheck disable=SC1090
. "$TC_LOCAL_ENV"
"$@"
