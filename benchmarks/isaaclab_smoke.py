"""Smoke run of IsaacLabEnv on a real Isaac Lab 3.0 task, kit-less, Newton (MuJoCo-Warp) physics on CPU.

Needs its own environment (Isaac Lab pins mujoco 3.x / warp 1.17, see shared SIMULATORS.md), e.g.::

    /work/isaac-venv/bin/python benchmarks/isaaclab_smoke.py --num-envs 8 --steps 20

The cartpole USD normally comes from NVIDIA's servers; when a local USD is found in the newton package
(or given with --usd) the asset spawn is pointed at it and the remote ground plane is dropped.
Success (user callable): the pole is upright, |pole angle| < 0.05 rad.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _find_cartpole_usd() -> str | None:
    try:
        import newton  # noqa: F401

        root = os.path.dirname(newton.__file__)
    except Exception:
        return None
    hits = sorted(glob.glob(os.path.join(root, "**", "*artpole*.usd*"), recursive=True))
    return hits[0] if hits else None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="Isaac-Cartpole-Direct")
    p.add_argument("--num-envs", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--usd", default=None)
    args = p.parse_args()

    try:
        from vla_rl.envs.isaaclab import make_isaaclab_env
    except ImportError:  # repo not installed in this venv: load the module from the source tree
        import importlib.util
        import types

        here = os.path.join(os.path.dirname(__file__), "..", "envs")
        pkg = types.ModuleType("vla_rl_envs_src")
        pkg.__path__ = [here]
        sys.modules["vla_rl_envs_src"] = pkg
        for name in ("base", "isaaclab"):
            spec = importlib.util.spec_from_file_location(f"vla_rl_envs_src.{name}", os.path.join(here, f"{name}.py"))
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
        make_isaaclab_env = sys.modules["vla_rl_envs_src.isaaclab"].make_isaaclab_env
    import torch

    usd = args.usd or _find_cartpole_usd()
    print(f"local cartpole USD: {usd}")

    def cfg_overrides(cfg):
        if usd is not None:
            cfg.scene.cartpole.spawn.usd_path = usd
            if usd.endswith("newton/examples/assets/cartpole.usda"):
                # newton's example is a double-pole cartpole with other joint names: map them.
                cart, pole, pole2 = "railCartJoint", "cartPoleJoint", "polePoleJoint"
                cfg.cart_dof_name, cfg.pole_dof_name = cart, pole
                rob = cfg.scene.cartpole
                rob.init_state.joint_pos = {cart: 0.0, pole: 0.0, pole2: 0.0}
                rob.init_state.pos = (0.0, 0.0, 0.0)
                rob.actuators["cart_actuator"].joint_names_expr = [cart]
                rob.actuators["pole_actuator"].joint_names_expr = [pole, pole2]
        cfg.scene.ground = None

    def upright(env, groups):
        return groups["policy"][:, 0].abs() < 0.05  # DirectRL cartpole obs: [pole_pos, pole_vel, cart_pos, cart_vel]

    t0 = time.time()
    env = make_isaaclab_env(
        args.task, args.num_envs, device="cpu", cfg_overrides=cfg_overrides, overrides=("physics=newton_mjwarp",),
        success=upright, instruction="keep the pole upright",
    )
    print(f"made env in {time.time() - t0:.1f}s: spec={env.spec}")
    obs = env.reset(seed=0)
    print({k: (tuple(v.shape), v.dtype) if torch.is_tensor(v) else v[:2] for k, v in obs.items()})
    t0 = time.time()
    env.step(torch.zeros(env.num_envs, args.chunk, env.spec.action_dim))  # warm-up (kernel compile), untimed
    print(f"warm-up chunk: {time.time() - t0:.1f}s")
    n_succ = n_ep = 0
    t0 = time.time()
    for i in range(args.steps):
        a = torch.rand(env.num_envs, args.chunk, env.spec.action_dim) * 2 - 1
        obs, r, te, tr, info = env.step(a)
        n_succ += int(info["success"].sum())
        n_ep += int((te | tr).sum())
        if i < 3 or i == args.steps - 1:
            print(f"step {i}: reward={r.tolist()} term={te.int().tolist()} trunc={tr.int().tolist()} "
                  f"final_obs={'final_obs' in info}")
    dt = time.time() - t0
    print(f"{args.steps} chunks x {args.chunk} steps x {env.num_envs} envs in {dt:.2f}s = "
          f"{args.steps * args.chunk * env.num_envs / dt:.0f} env-steps/s; episodes ended {n_ep}, successes {n_succ}")
    env.close()


if __name__ == "__main__":
    main()
