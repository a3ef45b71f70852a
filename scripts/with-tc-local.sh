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
# tc-local listens on fixed ports inside the kernel's ephemeral range (32768-60999): a client
# connection that happened to get one of them as its local port makes that service's listen
# fail with EADDRINUSE (seen once: the queue on 58002). While the deployment is up the kernel
# is told not to hand them out; the setting is put back afterwards.
reserved=/proc/sys/net/ipv4/ip_local_reserved_ports
reserved_before=""
if [ -w "$reserved" ]; then
  reserved_before=$(cat "$reserved")
  echo "${reserved_before:+$reserved_before,}25679,43699,54329,58000-58009" >"$reserved"
fi
restore_reserved() { if [ -w "$reserved" ]; then echo "$reserved_before" >"$reserved"; fi; }
# A deployment left up (or half up) by an earlier run is replaced: the tests want a fresh one.
"$tc_local" down >/dev/null 2>&1 || true
"$tc_local" up >/dev/null
trap '"$tc_local" down >/dev/null 2>&1 || true; restore_reserved' EXIT
export TC_LOCAL_ENV="${TC_RUN:-/tmp/tc-local}/env.sh"
# shellcheck disable=SC1090
. "$TC_LOCAL_ENV"
"$@"
