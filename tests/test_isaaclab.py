"""IsaacLabEnv against a fake Isaac Lab env (no Isaac Lab needed).

The fake mirrors the API surface the adapter uses, from isaac-sim/IsaacLab (3.0):
* ``source/isaaclab/isaaclab/envs/manager_based_rl_env.py`` ``ManagerBasedRLEnv.step``: actions ->
  physics -> ``episode_length_buf += 1`` -> ``reset_buf = termination_manager.compute()``,
  ``reset_terminated = termination_manager.terminated``, ``reset_time_outs = termination_manager.time_outs``
  -> reward -> if ``cfg.compute_final_obs``: ``extras["final_obs"] = observation_manager.compute()``
  (pre-reset) -> ``_reset_idx(reset_env_ids)`` -> ``obs_buf = observation_manager.compute()`` ->
  ``return obs_buf, reward_buf, reset_terminated, reset_time_outs, extras``; ``reset()`` returns
  ``(obs_buf, extras)``; ``single_action_space`` a gym Box, ``max_episode_length``, ``step_dt``.
* ``source/isaaclab/isaaclab/managers/termination_manager.py``: ``active_terms`` (list of names),
  ``get_term(name)`` returns the term's done buffer of the last ``compute()`` (kept through reset).
* ``source/isaaclab/isaaclab/sensors/camera/tiled_camera.py``: ``scene[name].data.output["rgb"]``
  is ``(N, H, W, 3)`` uint8; ``InteractiveScene.__getitem__`` raises ``KeyError`` for unknown names.
"""

from __future__ import annotations

import types

import gymnasium as gym
import numpy as np
import pytest
import torch

from vla_rl.envs.base import EnvError
from vla_rl.envs.isaaclab import IsaacLabEnv, _merge_groups

N, H, W = 4, 6, 5


class _TermMgr:
    def __init__(self, names):
        self.active_terms = list(names)
        self._dones = torch.zeros(N, len(names), dtype=torch.bool)

    def get_term(self, name):
        return self._dones[:, self.active_terms.index(name)]


class _Scene(dict):
    def __getitem__(self, key):
        if key not in self:
            raise KeyError(f"Scene entity with key '{key}' not found. Available Entities: '{list(self)}'")
        return dict.__getitem__(self, key)


class FakeIsaacLabEnv:
    """Env i integrates x += action[0]; terms: success (x >= 3), fell (x <= -3), time_out."""

    def __init__(self, max_len=10, compute_final_obs=True, success_is_term=True, concat=True):
        self.num_envs, self.device = N, "cpu"
        self.cfg = types.SimpleNamespace(compute_final_obs=compute_final_obs)
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.max_episode_length, self.step_dt = max_len, 0.05
        self.success_is_term = success_is_term
        self.concat = concat
        names = (["success"] if success_is_term else []) + ["fell", "time_out"]
        self.termination_manager = _TermMgr(names)
        self.x = torch.zeros(N)
        self.episode_length_buf = torch.zeros(N, dtype=torch.long)
        cam = types.SimpleNamespace(data=types.SimpleNamespace(output={"rgb": torch.zeros(N, H, W, 3, dtype=torch.uint8)}))
        self.scene = _Scene(cam0=cam, robot=object())
        self.observation_manager = types.SimpleNamespace(compute=self._obs)
        self.resets = []
        self.actions = []

    @property
    def unwrapped(self):
        return self

    def _obs(self):
        self.scene["cam0"].data.output["rgb"][:] = (self.x.clamp(0, 10) * 10).to(torch.uint8)[:, None, None, None]
        pol = {"x": self.x[:, None].clone(), "t": self.episode_length_buf[:, None].float()}
        policy = torch.cat(list(pol.values()), -1) if self.concat else pol
        return {"policy": policy, "critic": torch.stack([2 * self.x, -self.x], -1)}

    def _reset_idx(self, env_ids):
        self.resets.append(env_ids.tolist())
        self.x[env_ids] = 0.0
        self.episode_length_buf[env_ids] = 0

    def reset(self, seed=None, options=None):
        self._reset_idx(torch.arange(N))
        return self._obs(), {}

    def step(self, action):
        assert action.shape == (N, 2)
        self.actions.append(action.clone())
        self.x += action[:, 0]
        self.episode_length_buf += 1
        tm = self.termination_manager
        cols = {"success": self.x >= 3, "fell": self.x <= -3, "time_out": self.episode_length_buf >= self.max_episode_length}
        tm._dones = torch.stack([cols[k] for k in tm.active_terms], -1)
        time_outs = cols["time_out"]
        terminated = tm._dones.any(-1) & ~time_outs
        reward = self.x.clone()
        extras = {"log": {}, "my_success": self.x >= 3}
        if self.cfg.compute_final_obs:
            extras["final_obs"] = self._obs()
        ids = (terminated | time_outs).nonzero().flatten()
        if len(ids):
            self._reset_idx(ids)
        return self._obs(), reward, terminated, time_outs, extras

    def close(self):
        pass


def act(*xs):
    a = torch.zeros(N, 2)
    a[:, 0] = torch.tensor(xs, dtype=torch.float32)
    return a


def test_obs_mapping_shapes_and_spec():
    fake = FakeIsaacLabEnv()
    env = IsaacLabEnv(fake, privileged="critic", cameras=["cam0"], instruction="balance")
    obs = env.reset()
    assert obs["state"].shape == (N, 2) and obs["state"].dtype == torch.float32
    assert obs["privileged"].shape == (N, 2)
    assert obs["rgb"].shape == (N, 1, 3, H, W) and obs["rgb"].dtype == torch.uint8
    assert obs["instruction"] == ["balance"] * N
    assert env.spec.action_dim == 2 and env.spec.state_dim == 2 and env.spec.privileged_dim == 2
    assert env.spec.image_size == (H, W) and env.spec.max_episode_steps == 10
    assert env.spec.control_hz == pytest.approx(20.0)
    assert env.device == torch.device("cpu")
    o, r, te, tr, info = env.step(act(1, 0.5, 0, -1))
    assert torch.allclose(o["state"][:, 0], torch.tensor([1, 0.5, 0, -1.0]))
    assert torch.allclose(o["privileged"][:, 0], 2 * o["state"][:, 0])
    assert o["rgb"][0, 0, :, 0, 0].tolist() == [10, 10, 10]
    assert r.shape == te.shape == tr.shape == info["success"].shape == (N,)


def test_term_selection_and_instruction_callable():
    fake = FakeIsaacLabEnv(concat=False)
    env = IsaacLabEnv(fake, state="policy/x", instruction=lambda e: [f"env {i}" for i in range(e.num_envs)])
    obs = env.reset()
    assert obs["state"].shape == (N, 1) and obs["instruction"][3] == "env 3"
    env2 = IsaacLabEnv(FakeIsaacLabEnv(concat=False))  # whole non-concatenated group -> concatenated terms
    assert env2.reset()["state"].shape == (N, 2)


def test_success_reward_terminated_and_final_obs():
    fake = FakeIsaacLabEnv()
    env = IsaacLabEnv(fake)
    env.reset()
    env.step(act(1, 1, 0, -1))
    env.step(act(1, 1, 0, -1))
    o, r, te, tr, info = env.step(act(1, 0, 0, -1))  # env0 reaches 3 -> success; env3 reaches -3 -> fell
    assert r.tolist() == [1, 0, 0, 0]
    assert te.tolist() == [True, False, False, True] and not tr.any()
    assert info["success"].tolist() == [True, False, False, False]
    assert info["final_obs"]["state"][0, 0] == 3 and info["final_obs"]["state"][3, 0] == -3
    assert o["state"][0, 0] == 0 and o["state"][3, 0] == 0  # auto-reset
    assert info["episode_length"].tolist() == [3, 0, 0, 3]
    assert info["episode_return"].tolist() == [1, 0, 0, 0]


def test_env_reward_opt_in():
    env = IsaacLabEnv(FakeIsaacLabEnv(), reward="env")
    env.reset()
    _, r, *_ = env.step(torch.stack([act(1, 1, 0, -1), act(1, 1, 0, -1)], 1))
    assert r.tolist() == [3, 3, 0, -3]


def test_truncation_from_isaaclab_time_out():
    env = IsaacLabEnv(FakeIsaacLabEnv(max_len=3))
    env.reset()
    for _ in range(2):
        _, _, te, tr, _ = env.step(act(0, 0, 0, 0))
        assert not tr.any()
    _, r, te, tr, info = env.step(act(0, 0, 0, 0))
    assert tr.all() and not te.any() and not info["success"].any() and r.sum() == 0
    assert info["episode_length"].tolist() == [3] * N


def test_chunk_freezes_ended_envs_and_holds_action():
    fake = FakeIsaacLabEnv()
    env = IsaacLabEnv(fake)
    env.reset()
    chunk = torch.zeros(N, 5, 2)
    chunk[0, :, 0] = torch.tensor([2.5, 0.5, 0.7, 0.3, 0.1])  # env0 succeeds at t=1
    chunk[1, :, 0] = 0.5
    o, r, te, tr, info = env.step(chunk)
    assert r.tolist() == [1, 0, 0, 0] and te.tolist() == [True, False, False, False]
    # after the end, env0 kept receiving its last executed action (0.5) in its new episode
    assert torch.stack(fake.actions)[:, 0, 0].tolist() == [2.5, 0.5, 0.5, 0.5, 0.5]
    assert o["state"][0, 0] == 1.5 and o["state"][0, 1] == 3  # new episode, 3 held steps in (documented)
    assert info["final_obs"]["state"][0, 0] == 3.0 and info["final_obs"]["state"][0, 1] == 2
    assert info["episode_length"].tolist() == [2, 0, 0, 0]
    assert o["state"][1, 0] == 2.5
    assert info["success"].tolist() == [True, False, False, False]


def test_chunk_second_end_in_new_episode_is_discarded():
    fake = FakeIsaacLabEnv()
    env = IsaacLabEnv(fake)
    env.reset()
    chunk = torch.zeros(N, 7, 2)
    chunk[0, :2, 0] = torch.tensor([2.0, 1.0])  # success at t=1; held 1.0 succeeds again at t=4 (ignored)
    n0 = len(fake.resets)
    _, r, te, tr, info = env.step(chunk)
    assert r.tolist() == [1, 0, 0, 0] and len(fake.resets) == n0 + 2  # two Isaac Lab resets of env0
    assert info["final_obs"]["state"][0, 0] == 3.0


def test_success_callable_with_adapter_reset():
    """Success from a user callable on obs; Isaac Lab did not reset that env, so the adapter does."""
    fake = FakeIsaacLabEnv(success_is_term=False)
    seen = []

    def upright(e, groups):
        seen.append(groups["policy"][:, 0].clone())
        return groups["policy"][:, 0] >= 2

    env = IsaacLabEnv(fake, success=upright)
    env.reset()
    o, r, te, tr, info = env.step(act(2, 1, 0, 0))
    assert r.tolist() == [1, 0, 0, 0] and te.tolist() == [True, False, False, False]
    assert fake.resets[-1] == [0]
    assert o["state"][0, 0] == 0 and info["final_obs"]["state"][0, 0] == 2


def test_success_callable_sees_pre_reset_obs():
    fake = FakeIsaacLabEnv(max_len=2, success_is_term=False)
    env = IsaacLabEnv(fake, success=lambda e, g: g["policy"][:, 0] >= 2)
    env.reset()
    env.step(act(1, 0, 0, 0))
    _, r, te, tr, info = env.step(act(1, 0, 0, 0))  # env0 hits x=2 on the time-out step
    assert r.tolist() == [1, 0, 0, 0] and te[0] and not tr[0] and tr[1:].all()


def test_success_from_extras_key():
    env = IsaacLabEnv(FakeIsaacLabEnv(success_is_term=False), success="extras:my_success")
    env.reset()
    _, r, *_ = env.step(torch.stack([act(1, 0, 0, 0)] * 3, 1))
    assert r.tolist() == [1, 0, 0, 0]


def test_errors_name_the_missing_piece():
    with pytest.raises(EnvError, match="'vision'"):
        IsaacLabEnv(FakeIsaacLabEnv(), state="vision")
    with pytest.raises(EnvError, match="'nope'"):
        IsaacLabEnv(FakeIsaacLabEnv(concat=False), state="policy/nope")
    with pytest.raises(EnvError, match="'wrist'"):
        IsaacLabEnv(FakeIsaacLabEnv(), cameras=["wrist"])
    with pytest.raises(EnvError, match="'goal_reached'.*fell"):
        IsaacLabEnv(FakeIsaacLabEnv(), success="goal_reached")
    env = IsaacLabEnv(FakeIsaacLabEnv(), success="extras:done_ok")
    with pytest.raises(EnvError, match="'done_ok'"):
        env.step(act(0, 0, 0, 0))
    with pytest.raises(EnvError, match="action must have shape"):
        env.step(torch.zeros(N, 3))
    with pytest.raises(EnvError, match="reward"):
        IsaacLabEnv(FakeIsaacLabEnv(), reward="shaped")


def test_merge_groups_nested():
    post = {"policy": {"a": torch.zeros(2, 1)}, "critic": torch.zeros(2, 2)}
    pre = {"policy": {"a": torch.ones(2, 1)}, "critic": torch.ones(2, 2)}
    m = _merge_groups(post, pre, torch.tensor([True, False]))
    assert m["policy"]["a"].flatten().tolist() == [1, 0] and m["critic"][:, 0].tolist() == [1, 0]


def test_missing_isaaclab_is_a_clear_error(monkeypatch):
    # The adapter module itself imported without Isaac Lab (top of this file); building a task needs it.
    import sys

    from vla_rl.envs.isaaclab import make_isaaclab_env

    monkeypatch.setitem(sys.modules, "isaaclab_tasks", None)  # import now raises ImportError
    with pytest.raises(EnvError, match="needs Isaac Lab"):
        make_isaaclab_env("Isaac-Cartpole-Direct-v0", 4)


def test_event_terms_from_randomization(monkeypatch):
    """Parameter names mirror isaaclab/envs/mdp/events.py (3.0): randomize_rigid_body_material.__call__
    (static_friction_range, dynamic_friction_range, restitution_range, num_buckets, asset_cfg),
    randomize_rigid_body_mass (asset_cfg, mass_distribution_params, operation), randomize_actuator_gains
    (asset_cfg, stiffness_distribution_params, damping_distribution_params, operation),
    randomize_joint_parameters (asset_cfg, friction/armature_distribution_params, operation)."""
    import sys

    from vla_rl.envs.isaaclab import event_terms_from_randomization
    from vla_rl.envs.randomization import DynamicsConfig

    events = types.SimpleNamespace(
        randomize_rigid_body_material="MAT", randomize_rigid_body_mass="MASS",
        randomize_actuator_gains="GAINS", randomize_joint_parameters="JOINT",
    )
    managers = types.SimpleNamespace(
        EventTermCfg=lambda func, mode, params: types.SimpleNamespace(func=func, mode=mode, params=params),
        SceneEntityCfg=lambda name, **kw: (name, kw),
    )
    monkeypatch.setitem(sys.modules, "isaaclab", types.ModuleType("isaaclab"))
    monkeypatch.setitem(sys.modules, "isaaclab.envs", types.ModuleType("isaaclab.envs"))
    mdp = types.ModuleType("isaaclab.envs.mdp")
    mdp.events = events
    monkeypatch.setitem(sys.modules, "isaaclab.envs.mdp", mdp)
    monkeypatch.setitem(sys.modules, "isaaclab.managers", managers)
    dyn = DynamicsConfig(friction=(0.5, 1.5), mass=(0.8, 1.2), actuator_gain=(0.9, 1.1), damping=(0.7, 1.3))
    terms = event_terms_from_randomization(dyn, asset="robot", base_static_friction=0.8)
    assert set(terms) == {"randomize_friction", "randomize_mass", "randomize_actuator_gains"}
    f = terms["randomize_friction"]
    assert f.func == "MAT" and f.mode == "reset"
    assert f.params["static_friction_range"] == pytest.approx((0.4, 1.2))
    assert f.params["asset_cfg"] == ("robot", {"body_names": ".*"})
    assert terms["randomize_mass"].params["operation"] == "scale"
    g = terms["randomize_actuator_gains"].params
    assert g["stiffness_distribution_params"] == (0.9, 1.1) and g["damping_distribution_params"] == (0.7, 1.3)
    assert event_terms_from_randomization(DynamicsConfig()) == {}
