#!/usr/bin/env bash
# The browser the ranking-page tests drive: Debian's chromium and chromium-driver (nothing is downloaded at
# test time). Idempotent: returns at once when both are installed. Needs root or password-less sudo.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: no apt-get here: install chromium and its chromedriver yourself for the ranking-page tests" >&2
    exit 1
fi
SUDO=()
if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then SUDO=(sudo -n); else
        echo "setup: not root: run 'sudo apt-get install chromium chromium-driver' for the ranking-page tests" >&2
        exit 1
    fi
fi
echo "setup: installing chromium and chromium-driver (apt-get)"
LOG="$(mktemp)"
export DEBIAN_FRONTEND=noninteractive
if ! "${SUDO[@]}" apt-get install -y -q chromium chromium-driver >"$LOG" 2>&1; then
    # package lists missing or stale: refresh them once
    "${SUDO[@]}" apt-get update -q >>"$LOG" 2>&1 && "${SUDO[@]}" apt-get install -y -q chromium chromium-driver >>"$LOG" 2>&1 \
        || { tail -n 30 "$LOG"; echo "setup: apt-get install chromium chromium-driver failed" >&2; exit 1; }
fi
rm -f "$LOG"
