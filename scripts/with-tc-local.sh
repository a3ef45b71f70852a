#!/usr/bin/env bash
# Runs a command with the local Taskcluster deployment up (../shared/taskcluster/tc-local), for the
# `taskvm worker` integration tests: `tc-local install`, then `up` with claims that expire after
# 15 s (so that claim expiry is tested in seconds), the command with the deployment's variables,
# then `tc-local down` whatever the command's outcome. Set TC_LOCAL to the script's path if it is
# elsewhere.
#
#   with-tc-local.sh [--meanwhile 'PREPARATION'] COMMAND...
#
# With --meanwhile, the deployment is installed and brought up in the background while the
# shell command PREPARATION runs (`make test` compiles then): COMMAND runs once both are done,
# and not at all if either failed.
set -euo pipefail
cd "$(dirname "$0")/.."
tc_local=${TC_LOCAL:-../shared/taskcluster/tc-local}
if [ ! -x "$tc_local" ]; then
  echo "with-tc-local: $tc_local is missing; set TC_LOCAL to the tc-local script" >&2
  exit 1
fi
meanwhile=""
if [ "${1:-}" = "--meanwhile" ]; then
  meanwhile=$2
  shift 2
fi
export TASK_CLAIM_TIMEOUT=${TASK_CLAIM_TIMEOUT:-15}
log=${TMPDIR:-/tmp}/with-tc-local.$$.log

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
finish() {
  "$tc_local" down >/dev/null 2>&1 || true
  if [ -w "$reserved" ]; then echo "$reserved_before" >"$reserved"; fi
  rm -f "$log"
}
trap finish EXIT

# A deployment left up (or half up) by an earlier run is replaced: the tests want a fresh one.
bring_up() {
  "$tc_local" install && { "$tc_local" down || true; } && "$tc_local" up
}
if [ -n "$meanwhile" ]; then
  bring_up >"$log" 2>&1 &
  deployment=$!
  prepared=0
  bash -c "$meanwhile" || prepared=$?
  if ! wait "$deployment"; then
    cat "$log" >&2
    echo "with-tc-local: bringing the deployment up failed (its output is above)" >&2
    exit 1
  fi
  [ "$prepared" -eq 0 ] || exit "$prepared"
  echo "with-tc-local: the deployment is up" >&2
else
  bring_up >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
fi
export TC_LOCAL_ENV="${TC_RUN:-/tmp/tc-local}/env.sh"
# shellcheck disable=SC1090
. "$TC_LOCAL_ENV"
"$@"
