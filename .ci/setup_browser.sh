#!/usr/bin/env bash
# Install what the `browser` test marker needs: Debian's chromium (driven headless, as root with
# --no-sandbox, by Playwright through the system binary; Playwright's own browser downloads are
# not used) and the project's `web-test` extra (playwright) in the venv.
# Idempotent: a chromium on PATH and an importable playwright exit at once.
#
#   bash .ci/setup_browser.sh
#   LORADEX_PYTHON=/path/to/python bash .ci/setup_browser.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${LORADEX_PYTHON:-$HERE/.venv/bin/python}"

if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  echo "setup_browser: $(command -v chromium || command -v chromium-browser) already installed"
else
  SUDO=""
  if [[ "$(id -u)" != "0" ]]; then SUDO="sudo"; fi
  echo "setup_browser: installing chromium with apt-get"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

if "$PY" -c "import playwright.sync_api" >/dev/null 2>&1; then
  echo "setup_browser: playwright already installed"
else
  echo "setup_browser: installing the web-test extra (playwright)"
  "$PY" -m pip install -q -e "$HERE[web-test]"
fi
