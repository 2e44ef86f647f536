#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: system libraries for offscreen rendering (when root and
# missing), a virtual environment in .venv with the CPU build of torch pinned first (an unpinned
# torch would pull a multi-GB CUDA build), then this package with its test and language extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ldconfig -p 2>/dev/null | grep -q 'libEGL_mesa'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libegl1 libegl-mesa0 libgl1-mesa-dri >/dev/null
  else
    echo "warning: EGL (libegl1 libegl-mesa0 libgl1-mesa-dri) not found; camera rendering will fail" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,language,video,warp,vlm]"
echo "set-up done: $(python -c 'import torch, mujoco; print("torch", torch.__version__, "mujoco", mujoco.__version__)')"
