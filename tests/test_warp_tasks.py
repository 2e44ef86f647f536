"""The built-in tasks on the mujoco-warp backend (warp's CPU device) against the CPU MuJoCo backend.

All warp envs here share one configuration (lift, randomization on, one 32x32 camera) so the kernels
are compiled once (~40 s cold, cached in ~/.cache/warp).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("warp")
pytest.importorskip("mujoco_warp")

from vla_rl.envs import make_env  # noqa: E402
from vla_rl.envs.mujoco_warp import TaskWarpEnv  # noqa: E402

N = 4
RAND = {
    "dynamics": {"friction": [0.7, 1.3], "mass": [0.5, 2.0], "damping": [0.5, 2.0], "armature": [0.8, 1.2],
                 "actuator_gain": [0.7, 1.3]},
    "camera": {"pos_jitter": 0.02, "fovy_jitter": 3.0},
}
KW = dict(randomization=RAND, state_includes_objects=True)


def _warp(seed=0):
    # Through the public switch: backend="warp" on warp's CPU device.
    env = make_env("lift", N, backend="warp", device="cpu", seed=seed, cameras=("front",), image_size=(32, 32), **KW)
    assert isinstance(env, TaskWarpEnv)
    return env


@pytest.fixture(scope="module")
def wenv():
    e = _warp()
    yield e
    e.close()


def _actions():
    a = torch.zeros(8, N, 4)
    a[:4, :, 2] = -1.0  # hand down
    a[:, 1, 0] = 0.5
    a[:, 2, 1] = -0.7
    a[4:, :, 3] = -1.0  # close
    a[6:, :, 2] = 1.0  # and up
    return a


def test_agrees_with_cpu_backend(wenv):
    """Same seed -> same episodes and randomization draws; then states agree within 1 mm.

    Tolerance 1e-3 m: warp runs in float32, MuJoCo C in float64; measured differences after 8 control
    steps (200 physics steps, gripper closing on the table and objects) are ~3e-5 m. A wrong control
    law, gain, randomization write or reset shows up as centimetres.
    """
    cenv = make_env("lift", N, backend="cpu", seed=0, **KW)
    ow, oc = wenv.reset(seed=0), cenv.reset(seed=0)
    assert ow["instruction"] == oc["instruction"]
    assert ow["state"].shape == oc["state"].shape and ow["rgb"].shape == (N, 1, 3, 32, 32)
    for a in _actions():
        ow, rw, tw, trw, iw = wenv.step(a)
        oc, rc, tc, trc, ic = cenv.step(a)
        torch.testing.assert_close(ow["state"], oc["state"], atol=1e-3, rtol=0)
        torch.testing.assert_close(ow["privileged"], oc["privileged"], atol=1e-3, rtol=0)
        assert torch.equal(rw, rc) and torch.equal(tw, tc)
    for k, v in ic["randomization"].items():
        torch.testing.assert_close(iw["randomization"][k].cpu(), v, msg=k)
    cenv.close()


def test_randomization_lands_in_model_fields(wenv):
    wenv.reset(seed=3)
    r = wenv.rand_values
    v = wenv.views
    lo, hi = RAND["dynamics"]["friction"]
    assert ((r["friction"] >= lo) & (r["friction"] <= hi)).all() and r["friction"].std() > 0
    nom = wenv.nominal
    fr = v.model_field("geom_friction")
    torch.testing.assert_close(fr[:, wenv.grip, 0], nom["geom_friction"][wenv.grip, 0][None].float() * r["friction"][:, None])
    torch.testing.assert_close(v.model_field("body_mass")[:, wenv.obj_body], nom["body_mass"][wenv.obj_body][None].float() * r["mass"][:, None])
    torch.testing.assert_close(v.model_field("actuator_gainprm")[:, :, 0], nom["actuator_gainprm"][:, 0][None].float() * r["actuator_gain"][:, None])
    torch.testing.assert_close(v.model_field("actuator_biasprm")[:, :, 1], nom["actuator_biasprm"][:, 1][None].float() * r["actuator_gain"][:, None])
    torch.testing.assert_close(v.model_field("light_diffuse")[:, 0], r["light_rgb"].float())
    assert torch.equal(v.model_field("geom_matid")[:, wenv.table_geom].long(), wenv.table_mat0 + r["table_texture"])
    # the fields not randomized stay shared (one copy) and per-world fields really have N rows
    assert fr.shape[0] == N and v.model_field("geom_size").shape[0] == 1


def test_reset_of_one_world_does_not_disturb_others(wenv):
    other = _warp()  # same configuration: no new compile
    acts = _actions()
    wenv.reset(seed=9)
    other.reset(seed=9)
    for a in acts[:3]:
        wenv.step(a)
        other.step(a)
    keep = [0, 2, 3]
    before = wenv.views.qpos.clone()
    other._reset_envs(torch.tensor([1]))
    assert torch.equal(other.views.qpos[keep], before[keep])
    assert not torch.equal(other.views.qpos[1], before[1])
    for a in acts[3:]:
        wenv._control_step(a)
        other._control_step(a)
        assert torch.equal(other.views.qpos[keep], wenv.views.qpos[keep])
        assert torch.equal(other.views.qvel[keep], wenv.views.qvel[keep])
    other.close()


def test_rendering_differs_per_world(wenv):
    obs = wenv.reset(seed=4)
    img = obs["rgb"]
    assert img.dtype == torch.uint8 and img.shape == (N, 1, 3, 32, 32)
    assert img.float().std() > 5
    for i in range(N):
        for j in range(i + 1, N):
            assert (img[i].float() - img[j].float()).abs().mean() > 1.0, (i, j)
    assert isinstance(wenv, TaskWarpEnv)
