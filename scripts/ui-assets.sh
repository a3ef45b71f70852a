#!/usr/bin/env bash
# Installs what the web UI loads from a package of its own, inside the checkout: xterm.js
# (npm's @xterm/xterm, the exact version and hash in serve/ui/terminal/package-lock.json),
# the terminal of "Open shell". `taskvm serve` serves it from there (or from --xterm DIR).
# Does nothing when it is present. Used by `make deps`.
set -euo pipefail
cd "$(dirname "$0")/../serve/ui/terminal"
if [ ! -f node_modules/@xterm/xterm/lib/xterm.mjs ]; then
  echo "ui-assets: npm ci in serve/ui/terminal (@xterm/xterm)" >&2
  npm ci --no-audit --no-fund --loglevel=error
fi
