#!/usr/bin/env bash
# Installs what is missing, then runs the whole test suite (real nginx volumes,
# a real gunicorn master). Extra arguments go to pytest: ./test.sh -k put -x
set -euo pipefail
cd "$(dirname "$0")"
./install.sh --tests
exec .venv/bin/python -m pytest "$@"
