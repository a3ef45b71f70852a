#!/usr/bin/env bash
# Installs the tools only the tests use, inside the checkout (nothing system-wide): playwright-core
# from npm (drives Debian's Chromium in the web UI test) and schemathesis from PyPI (fuzzes the
# API from its OpenAPI document). Does nothing when both are present. Used by `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5

if [ ! -d cli/tests/ui/node_modules/playwright-core ]; then
  echo "test-tools: npm ci in cli/tests/ui (playwright-core)" >&2
  (cd cli/tests/ui && npm ci --no-audit --no-fund --loglevel=error)
fi

venv=target/pyenv
if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  echo "test-tools: schemathesis $SCHEMATHESIS_VERSION into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
