"""Test-wide setup. Headless offscreen rendering: MuJoCo picks its GL backend when it is first imported,
which may happen in any test module (e.g. via mujoco_warp), so choose EGL before anything imports it."""

import os

if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
    os.environ["MUJOCO_GL"] = "egl"
