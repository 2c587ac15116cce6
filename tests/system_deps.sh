#!/usr/bin/env bash
# What the tests need from the system rather than from PyPI, installed by `make test` itself: Debian's chromium,
# which the dashboard's browser test drives (Playwright never downloads a browser here). As root it is installed
# with apt-get; otherwise this stops at once with the exact command to run.
set -euo pipefail
chromium=${MMKD_CHROMIUM:-/usr/bin/chromium}
[ -x "$chromium" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "make test: installing Debian's chromium (the dashboard's browser test)"
  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
  [ -x "$chromium" ] && exit 0
fi
echo "make test: the dashboard's browser test needs Chromium at $chromium. Run:  sudo apt-get install -y chromium" >&2
echo "(or point MMKD_CHROMIUM at a Chromium binary), then make test again." >&2
exit 1
