#!/usr/bin/env bash
# The test command of README.md, and what CI runs: installs what the tests need on a fresh
# machine (a venv with the project, and Debian's Chromium for the dashboard's browser test),
# checks lint and formatting (ruff, configured in pyproject.toml), then runs pytest. Extra arguments go to pytest. MESHRT_TEST_DATABASE_URL=postgresql://… runs
# the same suite against PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1 && [ -z "${MESHRT_TEST_CHROMIUM:-}" ]; then
  as_root=""
  [ "$(id -u)" = 0 ] || as_root="sudo"
  $as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq chromium >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
# lint and format first: a minute of pytest is not spent on a tree that would be refused anyway
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
