#!/usr/bin/env bash
# Install headless Chromium and its WebDriver from Debian for tests/test_serve.py's
# browser test. Idempotent: does nothing when both are already on PATH. Needs root
# (or sudo) and the Debian package registry; the test skips with a reason otherwise.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    echo "install-browser: chromium and chromedriver are already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null; then
        echo "install-browser: need root or sudo to apt-get install chromium chromium-driver" >&2
        exit 1
    fi
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver
echo "install-browser: $(chromium --version) with $(chromedriver --version | head -c 40)"
