"""The MuJoCo CPU backend: shapes, seeding, chunked steps, auto-reset, final_obs, divergence, bad input."""

import numpy as np
import pytest
import torch

from vla_rl.envs import EnvConfig, EnvError, make_env, make_env_from_config
from vla_rl.envs.experts import make_expert

DIMS = {"lift": (4, 4 + 9, 9), "place": (4, 4 + 12, 12), "handover": (8, 8 + 3, 3)}


@pytest.mark.parametrize("task", list(DIMS))
def test_obs_shapes(task):
    a, s, p = DIMS[task]
    env = make_env(task, 3, seed=0)
    obs = env.reset()
    assert env.spec.action_dim == a and obs["state"].shape == (3, s) and obs["privileged"].shape == (3, p)
    assert len(obs["instruction"]) == 3 and all(isinstance(t, str) and t for t in obs["instruction"])
    assert len(env.spec.state_names) == s
    proprio_only = make_env(task, 2, state_includes_objects=False)
    assert proprio_only.reset()["state"].shape == (2, a)  # 4 proprio dims per hand


def test_cameras_default_off_and_rgb_shape():
    env = make_env("lift", 2, cameras=("front", "top"), image_size=(24, 32), seed=0)
    obs = env.reset()
    assert obs["rgb"].dtype == torch.uint8 and obs["rgb"].shape == (2, 2, 3, 24, 32)
    assert obs["state"].shape == (2, 4)  # with cameras, state defaults to proprio only
    assert "rgb" not in make_env("lift", 1).reset()
    env.close()


def test_unknown_task_backend_camera():
    with pytest.raises(EnvError, match="valid tasks"):
        make_env("stack", 1)
    with pytest.raises(EnvError, match="valid backends"):
        make_env("lift", 1, backend="isaac")
    with pytest.raises(EnvError, match="unknown camera"):
        make_env("lift", 1, cameras=("wrist",))
    with pytest.raises(EnvError, match="unknown env config key"):
        EnvConfig.from_dict({"tsk": "lift"})


def test_config_roundtrip():
    env = make_env_from_config({"task": "place", "num_envs": 2, "seed": 3, "randomization": {"split": "heldout"}})
    assert env.num_envs == 2 and env.rand.split == "heldout"


def _rollout(env, seed, steps=15):
    obs = env.reset(seed=seed)
    gen = torch.Generator().manual_seed(123)
    states, instr = [obs["state"]], [obs["instruction"]]
    for _ in range(steps):
        obs, *_ = env.step(torch.rand(env.num_envs, env.spec.action_dim, generator=gen) * 2 - 1)
        states.append(obs["state"])
        instr.append(obs["instruction"])
    return torch.stack(states), instr


def test_seeding_reproducible():
    rand = {"dynamics": {"friction": [0.8, 1.2], "action_noise": 0.1}}
    a = _rollout(make_env("place", 3, randomization=rand, max_episode_steps=6), seed=7)
    b = _rollout(make_env("place", 3, randomization=rand, max_episode_steps=6), seed=7)
    c = _rollout(make_env("place", 3, randomization=rand, max_episode_steps=6), seed=8)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])


def test_chunk_truncation_autoreset_final_obs():
    env = make_env("lift", 2, seed=0, max_episode_steps=3)
    env.reset()
    chunk = torch.zeros(2, 5, 4)
    chunk[:, :, 2] = 1.0  # move up: no success possible
    obs, reward, term, trunc, info = env.step(chunk)
    assert trunc.all() and not term.any() and reward.sum() == 0
    assert (info["episode_length"] == 3).all()  # frozen after the time limit inside the chunk
    assert (info["steps_executed"] == 3).all()  # of the 5 actions sent
    assert (env.episode_step == 0).all()  # auto-reset
    # final_obs keeps the raised hand; the fresh obs has the hand back at its start height.
    assert (info["final_obs"]["state"][:, 2] > obs["state"][:, 2] + 0.05).all()


def test_success_terminates_with_reward_one():
    env = make_env("lift", 4, seed=0)
    env.reset(seed=0)
    act = make_expert(env)
    for _ in range(40):
        obs, reward, term, trunc, info = env.step(act())
        if term.any():
            break
    assert term.any()
    assert torch.equal(reward[term], torch.ones(int(term.sum())))
    assert info["success"][term].all() and (env.episode_step[term] == 0).all()
    target = info["final_obs"]["privileged"].view(4, 3, 3)[term, :, 2]
    assert (target.max(-1).values > 0.1).all()


def test_diverging_env_is_reset_and_counted():
    env = make_env("lift", 3, seed=0)
    env.reset()
    env.step(torch.zeros(3, 4))
    env.datas[1].qvel[:] = np.nan
    obs, reward, term, trunc, info = env.step(torch.zeros(3, 4))
    assert info["unstable"].tolist() == [False, True, False]
    assert trunc[1] and not trunc[0]
    assert env.episode_step.tolist() == [2, 0, 2]
    assert torch.isfinite(obs["state"]).all() and np.isfinite(env.datas[1].qpos).all()
    obs, *_ , info = env.step(torch.zeros(3, 4))
    assert not info["unstable"].any()


def test_bad_actions():
    env = make_env("lift", 2)
    env.reset()
    with pytest.raises(EnvError, match="shape"):
        env.step(torch.zeros(2, 3))
    bad = torch.zeros(2, 4)
    bad[1, 0] = float("nan")
    with pytest.raises(EnvError, match="NaN"):
        env.step(bad)


def test_workspace_clamp():
    env = make_env("lift", 1, max_episode_steps=100)
    env.reset()
    for _ in range(30):
        env.step(torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
    assert (env.datas[0].mocap_pos[0] <= np.array([0.35, 0.4, 0.45]) + 1e-9).all()


def test_env_config_validates_with_omegaconf():
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    schema = OmegaConf.structured(EnvConfig)
    cfg = OmegaConf.merge(schema, {"task": "lift", "num_envs": 2, "randomization": {"dynamics": {"mass": [0.5, 2.0]}}})
    env = make_env_from_config(OmegaConf.to_object(cfg))
    assert env.rand.dynamics.mass == (0.5, 2.0)
    with pytest.raises(ConfigKeyError, match="tsk"):
        OmegaConf.merge(schema, {"tsk": "lift"})
    with pytest.raises(EnvError, match="dynamics.mass"):
        OmegaConf.to_object(OmegaConf.merge(schema, {"randomization": {"dynamics": {"mass": [2.0, 0.5]}}}))


def test_instruction_names_the_target_and_matches_episode():
    """The instruction the policy sees names the object and container the success predicate checks."""
    env = make_env("place", 6, seed=2)
    obs = env.reset(seed=2)
    ep = env.episode
    for _ in range(2):
        for i, text in enumerate(obs["instruction"]):
            assert ep.instruction[i] == text
            assert env.task.objects[int(ep.target[i])][1] in text
            assert env.task.containers[int(ep.goal[i])][1] in text
        obs = env.reset(seed=3)


def test_reset_group_blocks_start_identically():
    from vla_rl.envs import RandomizationConfig

    env = make_env("place", 6, seed=0, randomization=RandomizationConfig())
    obs = env.reset_group(3, seed=5)
    state, instr = obs["state"], obs["instruction"]
    for block in (slice(0, 3), slice(3, 6)):
        assert torch.equal(state[block], state[block][:1].expand(3, -1))
        assert len(set(instr[block])) == 1
        for v in env.rand_values.values():
            assert torch.equal(v[block], v[block][:1].expand_as(v[block]))
    assert not torch.equal(state[0], state[3])
    # Same actions -> the same trajectory within a block (the physics is deterministic).
    action = torch.rand(6, 4, 4) * 2 - 1
    action[3:] = action[0]
    action[1:3] = action[0]
    obs, *_ = env.step(action)
    assert torch.allclose(obs["state"][:3], obs["state"][:1].expand(3, -1), atol=1e-6)
    with pytest.raises(EnvError, match="group_size"):
        env.reset_group(4)
    # A plain reset afterwards draws every env independently again.
    assert len(set(env.reset(seed=6)["instruction"])) > 2
