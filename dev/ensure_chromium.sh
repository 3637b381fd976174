#!/usr/bin/env bash
# Make sure Debian's chromium is installed for the browser tests (idempotent: nothing to do when it is there).
# Playwright drives this system browser (/usr/bin/chromium); we never run `playwright install`.
# When another apt-get/dpkg runs, this waits for it (up to 10 minutes) instead of failing.
set -euo pipefail
CHROMIUM=${BP_CHROMIUM:-/usr/bin/chromium}  # overridable for the script's own test only
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "ensure_chromium: $CHROMIUM missing and no root/sudo to install it" >&2; exit 1; }
  SUDO=sudo
fi
WAIT_S=600
# apt-get waits for the dpkg lock with this option; `apt-get update` does not (apt 2.6: its lists lock fails at
# once, option or not), so update_lists retries while the lock is held.
APT=(apt-get -o "DPkg::Lock::Timeout=$WAIT_S")

update_lists() {
  local deadline=$((SECONDS + WAIT_S)) out
  until out=$($SUDO "${APT[@]}" update -qq 2>&1); do
    if ! grep -q "Could not get lock" <<<"$out" || [ "$SECONDS" -ge "$deadline" ]; then
      echo "$out" >&2
      return 1
    fi
    echo "ensure_chromium: another apt-get holds the package lists; waiting…" >&2
    sleep 2
  done
}

echo "installing chromium (apt-get; about a minute)…"
export DEBIAN_FRONTEND=noninteractive
update_lists
$SUDO "${APT[@]}" install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
[ -x "$CHROMIUM" ] || { echo "ensure_chromium: chromium did not install" >&2; exit 1; }
echo "chromium ready: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
