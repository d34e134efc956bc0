#!/usr/bin/env bash
# Gives the web UI test (tests/test_webui.py) its browser: Debian's Chromium at /usr/bin/chromium, which the playwright
# Python package from .venv (see bootstrap.sh) drives. Idempotent: once Chromium is there, a run only checks for it.
# Never runs `playwright install` (it downloads its own browser build, which fails here). Where Chromium cannot be
# installed (not root, no apt-get, apt-get failing) it says so and succeeds: the test then skips, printing the reason
# (under CI, CI=true, the test fails instead).
set -euo pipefail
CHROMIUM="${BLOCKLLM_CHROMIUM:-/usr/bin/chromium}"

log() { printf '[browser] %s\n' "$*" >&2; }

if [ -x "$CHROMIUM" ]; then
  log "chromium present ($CHROMIUM)"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  log "no chromium at $CHROMIUM and no way to install it here (needs root and apt-get): the web UI test will skip"
  exit 0
fi
log "installing Debian's chromium with apt-get (once; about a minute)"
apt_log="$(mktemp)"
if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >"$apt_log" 2>&1; then
  rm -f "$apt_log"
  log "chromium installed ($("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM"))"
else
  log "apt-get could not install chromium (log: $apt_log): the web UI test will skip"
fi
