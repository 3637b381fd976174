#!/usr/bin/env bash
# Make sure Debian's chromium is installed for the browser tests (idempotent: nothing to do when it is there).
# Playwright drives this system browser (/usr/bin/chromium); we never run `playwright install`.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "ensure_chromium: /usr/bin/chromium missing and no root/sudo to install it" >&2; exit 1; }
  SUDO=sudo
fi
echo "installing chromium (apt-get; about a minute)…"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
[ -x /usr/bin/chromium ] || { echo "ensure_chromium: chromium did not install" >&2; exit 1; }
echo "chromium ready: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
