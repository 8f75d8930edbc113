#!/usr/bin/env bash
# Browser-test dependencies of rlhfkit (tests/test_label_browser.py): Debian's chromium and the
# Playwright Python driver. Playwright's own browser download is never used (no `playwright install`):
# the tests launch /usr/bin/chromium through executable_path.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if ! command -v /usr/bin/chromium >/dev/null 2>&1; then
  apt-get update
  apt-get install -y --no-install-recommends chromium
fi
python -m pip install "playwright==1.65.2" "sqlalchemy>=2"
