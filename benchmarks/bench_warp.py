"""Throughput of the mujoco-warp backend next to the CPU MuJoCo backend, same task, same run.

    python benchmarks/bench_warp.py --task toy --num-envs 8 64 256 --device cpu          # CI machine
    python benchmarks/bench_warp.py --task toy --num-envs 1024 4096 16384 --device cuda:0 --cpu-max-envs 64
    python benchmarks/bench_warp.py --task lift ...   # a shared task, through make_env / make_warp_env

Reports, per backend / N / camera setting: env steps/s (control steps x worlds per second, random
actions, auto-reset included) and physics steps/s (x substeps). Warm-up steps (kernel compile, CUDA
graph capture) are excluded. ``--cpu-max-envs`` caps the CPU backend's N (it is linear in N).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(env, steps: int, warmup: int, chunk: int = 1) -> dict:
    n, a = env.num_envs, env.spec.action_dim
    dev = torch.device(getattr(env, "device", "cpu"))
    low = torch.as_tensor(env.spec.action_low or [-1.0] * a, dtype=torch.float32, device=dev)
    high = torch.as_tensor(env.spec.action_high or [1.0] * a, dtype=torch.float32, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)

    def act():
        return low + (high - low) * torch.rand((n, chunk, a), generator=gen, device=dev)

    env.reset(seed=0)
    for _ in range(warmup):
        env.step(act())
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        env.step(act())
    _sync(dev)
    dt = time.perf_counter() - t0
    substeps = int(getattr(env, "substeps", 0) or env.spec.extra.get("substeps", 0) or 0)
    env_sps = n * steps * chunk / dt
    return {"env_steps_per_s": env_sps, "physics_steps_per_s": env_sps * substeps if substeps else None,
            "substeps": substeps, "seconds": dt}


# ------------------------------------------------------------------ a self-contained scene
TOY_XML = """
<mujoco>
  <option timestep="0.005" integrator="implicitfast"/>
  <worldbody>
    <light name="top" pos="0 0 2" dir="0 0 -1" diffuse="0.8 0.8 0.8"/>
    <geom name="floor" type="plane" size="1 1 0.1" rgba="0.6 0.6 0.6 1"/>
    <camera name="front" pos="0.2 -1.0 0.6" xyaxes="1 0 0 0 0.5 1"/>
    <body name="link1" pos="0 0 0.1">
      <joint name="j1" type="hinge" axis="0 0 1" damping="1"/>
      <geom type="capsule" fromto="0 0 0 0.3 0 0" size="0.03" rgba="0.2 0.2 0.8 1"/>
      <body pos="0.3 0 0">
        <joint name="j2" type="hinge" axis="0 0 1" damping="1"/>
        <geom type="capsule" fromto="0 0 0 0.3 0 0" size="0.03" rgba="0.2 0.8 0.2 1"/>
        <body pos="0.3 0 0">
          <joint name="j3" type="hinge" axis="0 0 1" damping="1"/>
          <geom type="capsule" fromto="0 0 0 0.15 0 0" size="0.03" rgba="0.8 0.8 0.2 1"/>
        </body>
      </body>
    </body>
    <body name="cube" pos="0.4 0.25 0.03">
      <freejoint/>
      <geom name="cube" type="box" size="0.03 0.03 0.03" rgba="0.8 0.1 0.1 1" mass="0.1"/>
    </body>
  </worldbody>
  <actuator>
    <position joint="j1" kp="20" ctrlrange="-1 1"/>
    <position joint="j2" kp="20" ctrlrange="-1 1"/>
    <position joint="j3" kp="20" ctrlrange="-1 1"/>
  </actuator>
</mujoco>"""


def _toy_factories():
    """``--task toy``: a 3-joint arm + free cube, warp backend vs a plain MuJoCo C loop on CPU."""
    import mujoco
    import numpy as np

    from vla_rl.envs.base import BatchedEnv, EnvSpec
    from vla_rl.envs.mujoco_warp import MujocoWarpEnv, WarpTaskBinding

    mjm = mujoco.MjModel.from_xml_string(TOY_XML)
    cube = mujoco.mj_name2id(mjm, mujoco.mjtObj.mjOBJ_BODY, "cube")
    substeps = 10

    def spec(image_size):
        return EnvSpec(action_dim=3, state_dim=3, cameras=("front",) if image_size else (),
                       image_size=tuple(image_size or (0, 0)), max_episode_steps=50,
                       action_low=(-1.0,) * 3, action_high=(1.0,) * 3, extra={"substeps": substeps})

    def warp_env(task, n, device="cpu", image_size=None, **_):
        b = WarpTaskBinding(
            mjm=mjm, spec=spec(image_size), substeps=substeps,
            apply_action=lambda v, a: v.ctrl.copy_(a),
            init_state=lambda v, ids, g: None,
            observe=lambda v: {"state": v.qpos[:, :3], "privileged": v.xpos[:, cube]},
            success=lambda v: v.xpos[:, cube, 2] > 0.2,
            nconmax=16, njmax=64, instructions=["push the cube"],
        )
        return MujocoWarpEnv(b, n, device)

    class CpuToy(BatchedEnv):
        def __init__(self, n, image_size=None):
            super().__init__(spec(None), n, "cpu")
            self.substeps = substeps
            if image_size:
                raise SystemExit("toy CPU reference has no camera; use --no-cpu with cameras")
            self.datas = [mujoco.MjData(mjm) for _ in range(n)]

        def _reset_envs(self, ids):
            for i in ids.tolist():
                mujoco.mj_resetData(mjm, self.datas[i])

        def _control_step(self, a):
            a = a.numpy()
            for i, d in enumerate(self.datas):
                d.ctrl[:] = a[i]
                mujoco.mj_step(mjm, d, nstep=substeps)

        def _success(self):
            return torch.tensor([d.xpos[cube, 2] > 0.2 for d in self.datas])

        def _observe(self):
            return {"state": torch.tensor(np.array([d.qpos[:3] for d in self.datas]), dtype=torch.float32)}

    def cpu_env(task, n, backend="cpu", image_size=None, **_):
        return CpuToy(n, image_size)

    return cpu_env, warp_env


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="toy", help="'toy' (self-contained scene) or a task name of vla_rl.envs")
    p.add_argument("--num-envs", type=int, nargs="+", default=[8])
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20, help="timed control steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--image-sizes", type=int, nargs="*", default=[0, 64, 128],
                   help="0 = state only, S = one SxS camera")
    p.add_argument("--cpu-max-envs", type=int, default=256)
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU MuJoCo backend")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)

    if args.task == "toy":
        make_env, make_warp_env = _toy_factories()
    else:
        from vla_rl.envs import make_env
        from vla_rl.envs.mujoco_warp import make_warp_env

    rows = []
    print(f"# {platform.node()} torch {torch.__version__} device {args.device}"
          + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") else ""))
    print(f"{'backend':8} {'N':>6} {'camera':>8} {'env steps/s':>12} {'physics steps/s':>16}")
    for n in args.num_envs:
        for size in args.image_sizes:
            cam = {} if size == 0 else {"cameras": ("front",), "image_size": (size, size)}
            if args.task != "toy":  # the state-only rows must include object poses on both backends
                cam["state_includes_objects"] = True
            backends = [("warp", lambda: make_warp_env(args.task, n, device=args.device, **cam))]
            if not args.no_cpu and n <= args.cpu_max_envs and not (args.task == "toy" and size):
                backends.append(("cpu", lambda: make_env(args.task, n, backend="cpu", **cam)))
            for name, factory in backends:
                env = factory()
                try:
                    r = bench(env, args.steps, args.warmup)
                finally:
                    env.close()
                cam_s = "state" if size == 0 else f"{size}x{size}"
                phys = f"{r['physics_steps_per_s']:16.0f}" if r["physics_steps_per_s"] else f"{'-':>16}"
                print(f"{name:8} {n:6d} {cam_s:>8} {r['env_steps_per_s']:12.0f} {phys}", flush=True)
                rows.append({"backend": name, "num_envs": n, "camera": cam_s, "device": args.device, **r})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
