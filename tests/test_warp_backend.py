"""The mujoco-warp backend's generic machinery on warp's CPU device, against a small scene of its own.

One model (this XML, one set of batched fields) is compiled for all tests here, so the kernel compile
(~30 s cold, cached in ~/.cache/warp) is paid once. Task-level agreement with the CPU backend is in
``test_warp_tasks.py``.
"""

from __future__ import annotations

import mujoco
import numpy as np
import pytest
import torch

pytest.importorskip("warp")
pytest.importorskip("mujoco_warp")
import warp as wp  # noqa: E402

from vla_rl.envs.base import EnvSpec  # noqa: E402
from vla_rl.envs.mujoco_warp import (  # noqa: E402
    FieldRandomizer,
    FieldTerm,
    MujocoWarpEnv,
    WarpTaskBinding,
)

XML = """
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
      </body>
    </body>
    <body name="cube" pos="0.4 0.25 0.03">
      <freejoint/>
      <geom name="cube" type="box" size="0.03 0.03 0.03" rgba="0.8 0.1 0.1 1" mass="0.1"/>
    </body>
  </worldbody>
  <actuator>
    <position name="a1" joint="j1" kp="20"/>
    <position name="a2" joint="j2" kp="20"/>
  </actuator>
</mujoco>"""

N = 4
SUBSTEPS = 10


def _binding(mjm, randomize=True):
    cube = mujoco.mj_name2id(mjm, mujoco.mjtObj.mjOBJ_BODY, "cube")
    cube_geom = mujoco.mj_name2id(mjm, mujoco.mjtObj.mjOBJ_GEOM, "cube")
    light = 0

    def apply_action(v, a):
        v.ctrl.copy_(a)

    def init_state(v, ids, g):
        q = v.qpos[ids]
        q[:, 2] += 0.05 * torch.rand(len(ids), generator=g, device=q.device)
        v.qpos[ids] = q

    def observe(v):
        return {"state": v.qpos[:, :2], "privileged": v.xpos[:, cube]}

    def success(v):
        return v.xpos[:, cube, 2] > 0.2

    terms = [
        FieldTerm("friction", "geom_friction", (slice(None), 0), 0.5, 1.5),
        FieldTerm("mass", "body_mass", (cube,), 0.5, 2.0, also=(("body_inertia", (cube,)),)),
        FieldTerm("damping", "dof_damping", (slice(0, 2),), 0.5, 2.0),
        FieldTerm("gain", "actuator_gainprm", (slice(None), 0), 0.8, 1.2, also=(("actuator_biasprm", (slice(None), 1)),)),
        FieldTerm("light_rgb", "light_diffuse", (light,), [0.2, 0.2, 0.2], [1.0, 1.0, 1.0], op="set"),
        FieldTerm("cube_rgb", "geom_rgba", (cube_geom, slice(0, 3)), [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], op="set"),
    ]
    rand = FieldRandomizer(mjm, terms) if randomize else None
    spec = EnvSpec(action_dim=2, state_dim=2, privileged_dim=3, cameras=("front",), image_size=(32, 32), max_episode_steps=50)
    return WarpTaskBinding(
        mjm=mjm, spec=spec, substeps=SUBSTEPS, apply_action=apply_action, init_state=init_state,
        observe=observe, success=success, instructions=["push the cube"], randomizer=rand,
        batched_fields=rand.batched_fields if rand else (), nconmax=16, njmax=64,
    ), terms


@pytest.fixture(scope="module")
def env():
    mjm = mujoco.MjModel.from_xml_string(XML)
    b, terms = _binding(mjm)
    e = MujocoWarpEnv(b, N, "cpu", seed=0)
    e.terms = terms
    yield e
    e.close()


def test_shapes_and_obs(env):
    obs = env.reset(seed=1)
    assert obs["state"].shape == (N, 2) and obs["state"].dtype == torch.float32
    assert obs["privileged"].shape == (N, 3)
    assert obs["rgb"].shape == (N, 1, 3, 32, 32) and obs["rgb"].dtype == torch.uint8
    assert obs["instruction"] == ["push the cube"] * N
    obs, r, term, trunc, info = env.step(torch.zeros(N, 3, 2))
    assert r.shape == (N,) and not info["unstable"].any()
    assert info["rand/friction"].shape == (N,) and info["rand/light_rgb"].shape == (N, 3)


def test_randomization_in_range_and_in_model_fields(env):
    env.reset(seed=3)
    v = env.views
    mjm = env.mjm
    cube = v.body("cube")
    for t in env.terms:
        d = env._draws[t.name]
        lo = torch.as_tensor(t.low).float()
        hi = torch.as_tensor(t.high).float()
        assert ((d >= lo) & (d <= hi)).all(), t.name
        assert d.flatten(1).std(0).min() > 0 if d.dim() > 1 else d.std() > 0, f"{t.name}: same draw in all worlds"
    # the draws landed in the per-world model fields
    fr = v.model_field("geom_friction")
    assert fr.shape[0] == N
    torch.testing.assert_close(fr[:, :, 0], torch.from_numpy(mjm.geom_friction[:, 0]).float()[None] * env._draws["friction"][:, None])
    torch.testing.assert_close(v.model_field("body_mass")[:, cube], mjm.body_mass[cube] * env._draws["mass"])
    torch.testing.assert_close(v.model_field("body_inertia")[:, cube], torch.from_numpy(mjm.body_inertia[cube]).float()[None] * env._draws["mass"][:, None])
    g = env._draws["gain"]
    torch.testing.assert_close(v.model_field("actuator_gainprm")[:, :, 0], 20.0 * g[:, None].expand(N, 2))
    torch.testing.assert_close(v.model_field("actuator_biasprm")[:, :, 1], -20.0 * g[:, None].expand(N, 2))
    torch.testing.assert_close(v.model_field("light_diffuse")[:, 0], env._draws["light_rgb"])
    # and they act on the physics: same action, different gains/damping -> different arm motion
    env.step(torch.full((N, 5, 2), 0.5))
    j = v.qpos[:, 0]
    assert torch.unique(j).numel() == N


def test_reset_of_one_world_does_not_disturb_others(env):
    mjm = env.mjm
    env.reset(seed=5)
    actions = torch.rand(8, N, 2, generator=torch.Generator().manual_seed(0)) - 0.5
    for a in actions[:4]:
        env.step(a)
    qpos0, qvel0 = env.views.qpos.clone(), env.views.qvel.clone()
    warm = wp.to_torch(env.d.qacc_warmstart)
    warm0 = warm.clone()
    # reference: continue the batch untouched, world by world with MuJoCo C from the same states is not
    # bitwise comparable (float32 vs float64), so compare against the same warp batch without a reset.
    ref = []
    for a in actions[4:]:
        env._control_step(a)
        ref.append(env.views.qpos.clone())
    # restore the snapshot and replay with a reset of world 1 in between
    env.views.qpos.copy_(qpos0)
    env.views.qvel.copy_(qvel0)
    warm.copy_(warm0)
    env._run("forward", env._forward_launch)
    before = env._draws["friction"].clone()
    env._reset_envs(torch.tensor([1]))
    assert env._draws["friction"][1] != before[1]
    assert torch.equal(env._draws["friction"][[0, 2, 3]], before[[0, 2, 3]])
    others = [0, 2, 3]
    for k, a in enumerate(actions[4:]):
        env._control_step(a)
        assert torch.equal(env.views.qpos[others], ref[k][others]), f"step {k}: other worlds changed"
    assert not torch.equal(env.views.qpos[1], ref[-1][1])


def test_matches_mujoco_c_on_short_rollout():
    """Same model, same initial state, same controls: warp (float32) vs MuJoCo C (float64).

    Tolerance: 2e-3 (m / rad / quaternion units) after 0.5 s = 100 physics steps including the cube's
    floor contact: float32 round-off (~1e-7 relative) amplified by the contact solver stays orders of
    magnitude below this, while a wrong control mapping, gain, time step or reset moves the arm by
    ~0.1 rad and the cube by centimetres.
    """
    mjm = mujoco.MjModel.from_xml_string(XML)
    b, _ = _binding(mjm, randomize=False)
    b.spec.cameras = ()
    e = MujocoWarpEnv(b, 2, "cpu", seed=0)
    e.reset()
    q0 = e.views.qpos.double().numpy().copy()
    actions = torch.tensor([[0.6, -0.4], [-0.3, 0.8]]).float()
    mjd = [mujoco.MjData(mjm) for _ in range(2)]
    for w in range(2):
        mjd[w].qpos[:] = q0[w]
        mujoco.mj_forward(mjm, mjd[w])
    for step in range(10):
        a = actions * (1 if step < 5 else -1)
        e.step(a)
        for w in range(2):
            mjd[w].ctrl[:] = a[w].numpy()
            mujoco.mj_step(mjm, mjd[w], nstep=SUBSTEPS)
    for w in range(2):
        np.testing.assert_allclose(e.views.qpos[w].double().numpy(), mjd[w].qpos, atol=2e-3)
    assert abs(e.views.qpos[0, 0].item() - q0[0, 0]) > 0.05  # the arm really moved
    e.close()


def test_rendering_differs_with_light_and_colour(env):
    env.reset(seed=7)
    img = env.render()
    assert img.shape == (N, 1, 3, 32, 32)
    means = img.float().mean((1, 3, 4))  # [N, 3]
    assert img.float().std() > 1.0  # not blank
    for i in range(N):
        for j in range(i + 1, N):
            assert not torch.equal(img[i], img[j])
    # the same light in two worlds -> identical images where the scene state is identical
    ld = env.views.model_field("light_diffuse")
    rgba = env.views.model_field("geom_rgba")
    ld[1] = ld[0]
    rgba[1] = rgba[0]
    env.views.qpos[1] = env.views.qpos[0]
    env._run("forward", env._forward_launch)
    img2 = env.render()
    assert torch.equal(img2[0], img2[1])
    assert means.shape == (N, 3)


def test_nan_world_is_flagged_and_reset_alone(env):
    env.reset(seed=11)
    env.step(torch.zeros(N, 2))
    env.views.qvel[2, 0] = float("nan")
    qpos_before = env.views.qpos.clone()
    obs, r, term, trunc, info = env.step(torch.zeros(N, 2))
    assert info["unstable"].tolist() == [False, False, True, False]
    assert trunc[2] and not trunc[[0, 1, 3]].any()
    assert torch.isfinite(env.views.qpos).all() and torch.isfinite(env.views.qvel).all()
    assert env.episode_step[2] == 0 and (env.episode_step[[0, 1, 3]] == 2).all()
    assert torch.isfinite(qpos_before).all()


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_path_matches_plain_launches():
    """CUDA only: the graph-captured step/reset/render give the same states as plain launches."""
    mjm = mujoco.MjModel.from_xml_string(XML)
    envs = []
    for use_graph in (True, False):
        b, _ = _binding(mjm)
        envs.append(MujocoWarpEnv(b, 8, "cuda", use_graph=use_graph, seed=0))
    gen = torch.Generator(device="cuda").manual_seed(0)
    actions = torch.rand(12, 8, 2, 2, generator=gen, device="cuda") - 0.5
    outs = []
    for e in envs:
        e.reset(seed=0)
        for a in actions:
            obs, *_ = e.step(a)
        outs.append((obs["state"], obs["rgb"], e.views.qpos.clone()))
    torch.testing.assert_close(outs[0][2], outs[1][2], atol=1e-4, rtol=0)
    assert outs[0][1].shape == (8, 1, 3, 32, 32) and outs[0][1].device.type == "cuda"
