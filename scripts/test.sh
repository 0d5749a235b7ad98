#!/usr/bin/env bash
# The test command of README.md, and what CI runs: installs what the tests need on a fresh
# machine (a venv with the project, Debian's Chromium for the browser tests, Debian's nginx for
# the TLS edge test, docker.io and debootstrap for the image's test), checks lint and formatting (ruff, configured in pyproject.toml), then runs pytest. Extra arguments go to pytest. MESHRT_TEST_DATABASE_URL=postgresql://… runs
# the same suite against PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
if ! command -v chromium >/dev/null 2>&1 && [ -z "${MESHRT_TEST_CHROMIUM:-}" ]; then
  missing+=(chromium)
fi
# nginx: tests/test_nginx.py runs deploy/nginx.conf in front of the gateway
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  missing+=(nginx)
fi
# a Docker engine and debootstrap: tests/test_container.py builds deploy/Dockerfile on a base
# made from Debian's packages (no image registry is needed) and runs a session through it
if ! command -v dockerd >/dev/null 2>&1; then
  missing+=(docker.io)
fi
if ! command -v debootstrap >/dev/null 2>&1 && [ ! -x /usr/sbin/debootstrap ]; then
  missing+=(debootstrap)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  as_root=""
  [ "$(id -u)" = 0 ] || as_root="sudo"
  $as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq "${missing[@]}" >/dev/null
  # Debian starts the nginx service on install; the tests run their own, so it is not needed
  if [[ " ${missing[*]} " == *" nginx "* ]] && command -v systemctl >/dev/null 2>&1; then
    $as_root systemctl disable --now nginx >/dev/null 2>&1 || true
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
# lint and format first: a minute of pytest is not spent on a tree that would be refused anyway
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
