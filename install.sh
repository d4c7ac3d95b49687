#!/usr/bin/env bash
# Install ddlkit (editable) with its development tools into the active Python.
# torch comes first: an installed torch is kept (a CUDA build stays a CUDA
# build); without one, torch 2.13.0 is pinned, which on this project's machines
# is a local CPU wheel; an unpinned torch would pull gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")"
if ! python3 -c "import torch" 2>/dev/null; then
    python3 -m pip install "torch==2.13.0"
fi
python3 -m pip install -e ".[dev]"
# The browser test drives Debian's chromium through Playwright (Playwright's
# own browser download is never used). Installed only when missing.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive  # CI has no terminal to answer a prompt
        apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }
    else
        echo "install.sh: chromium is missing; the browser test needs it: sudo apt-get install -y chromium" >&2
    fi
fi
