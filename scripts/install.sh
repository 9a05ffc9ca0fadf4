#!/usr/bin/env bash
# Creates .venv and installs splitserve with its test extras. CPU torch is pinned first: an unpinned
# torch would pull a multi-GB CUDA build on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
# DS_BUILD_OPS=0: deepspeed installs without building its C++/CUDA ops (AutoTP needs none of them).
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e ".[test,triton]"
