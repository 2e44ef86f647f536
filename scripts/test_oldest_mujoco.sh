#!/usr/bin/env bash
# The core env suite on the oldest supported mujoco (pyproject: mujoco>=3.3), beside the venv's own mujoco:
# mujoco 3.3.0 is installed into its own directory, first on PYTHONPATH, as a suite that pins it would run.
#   bash scripts/test_oldest_mujoco.sh [version]      (default 3.3.0; uses .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${1:-3.3.0}"
TARGET="${TMPDIR:-/tmp}/vla_rl_mujoco_${VERSION}"
[ -d "$TARGET/mujoco" ] || .venv/bin/python -m pip install -q --no-deps --target "$TARGET" "mujoco==${VERSION}"
export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
.venv/bin/python -c "import mujoco; assert mujoco.__version__ == '${VERSION}', mujoco.__version__; print('mujoco', mujoco.__version__, 'from', mujoco.__file__)"
.venv/bin/python -W error::RuntimeWarning -c "import vla_rl.envs"  # no half-downgraded warning: a whole 3.x
.venv/bin/python -m pytest -q tests/test_envs.py tests/test_experts.py tests/test_envs_randomization.py \
    tests/test_envs_gym.py tests/test_env_plugins.py tests/test_mujoco_install.py "${@:2}"
