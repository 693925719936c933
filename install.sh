#!/usr/bin/env bash
# Installs what mkv needs, only what is missing, and can be run again at any time:
#   - nginx (Debian/Ubuntu package nginx-light: WebDAV, JSON autoindex); wrk and curl for bench.py
#   - with --tests (test.sh): chromium, rclone and s3cmd too, which tests run
#   - a Python virtualenv in .venv with requirements.txt
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else echo "install.sh: need root to run: $*" >&2; exit 1
  fi
}

apt_install() {
  echo "install.sh: installing $* with apt-get" >&2
  as_root apt-get update -q >/dev/null
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
}

# nginx-light: the volume server; wrk and curl: bench.py and its test
missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v wrk >/dev/null || missing+=(wrk)
command -v curl >/dev/null || missing+=(curl)
# for the tests only (./install.sh --tests, as test.sh runs it): the status
# page's test loads the page in a real headless chromium; the S3 gateway's
# tests run rclone and s3cmd against it
if [ "${1:-}" = --tests ]; then
  command -v chromium >/dev/null || missing+=(chromium)
  command -v rclone >/dev/null || missing+=(rclone)
  command -v s3cmd >/dev/null || missing+=(s3cmd)
fi
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || { echo "install.sh: install ${missing[*]} first (nginx with the dav module)" >&2; exit 1; }
  apt_install "${missing[@]}"
fi

if [ ! -x .venv/bin/pip ]; then
  rm -rf .venv
  if ! "$PYTHON" -m venv .venv >/dev/null 2>&1; then
    rm -rf .venv
    apt_install python3-venv
    "$PYTHON" -m venv .venv
  fi
fi

# reinstall only when requirements.txt changed since the last install
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat .venv/.requirements.sha256 2>/dev/null)" != "$want" ]; then
  echo "install.sh: installing Python packages into .venv" >&2
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  echo "$want" > .venv/.requirements.sha256
fi
