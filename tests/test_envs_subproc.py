"""Multi-process CPU envs (make_env(workers=W)): the same contract as one process, real worker processes."""

import pytest
import torch

from vla_rl.envs import EnvConfig, EnvError, make_env, make_env_from_config
from vla_rl.envs.subproc import SHARD_SEED_STRIDE


@pytest.fixture(scope="module")
def sharded():
    env = make_env("place", 4, seed=0, workers=2, max_episode_steps=6)
    yield env
    env.close()


def _actions(n, t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, t, 4, generator=g) * 2 - 1


def test_shards_step_exactly_like_single_process_envs(sharded):
    """Shard i is an ordinary env seeded seed + stride * i: its rows match that env step for step, through
    chunked steps, auto-resets (6-step deadline) and final_obs."""
    singles = [make_env("place", 2, seed=SHARD_SEED_STRIDE * i, max_episode_steps=6) for i in range(2)]
    obs = sharded.reset(seed=5)
    ref = [e.reset(seed=5 + SHARD_SEED_STRIDE * i) for i, e in enumerate(singles)]
    assert torch.equal(obs["state"], torch.cat([r["state"] for r in ref]))
    assert obs["instruction"] == ref[0]["instruction"] + ref[1]["instruction"]
    saw_final = False
    for k in range(4):
        a = _actions(4, 4, k)
        obs, rew, term, trunc, info = sharded.step(a)
        outs = [e.step(a[2 * i:2 * i + 2]) for i, e in enumerate(singles)]
        assert torch.equal(obs["state"], torch.cat([o[0]["state"] for o in outs]))
        assert torch.equal(trunc, torch.cat([o[3] for o in outs])) and torch.equal(rew, torch.cat([o[1] for o in outs]))
        assert set(info) >= {"success", "unstable", "steps_executed", "episode_return", "episode_length"}
        assert torch.equal(info["steps_executed"], torch.cat([o[4]["steps_executed"] for o in outs]))
        if trunc.any():
            saw_final = True
            ended = trunc.nonzero().flatten().tolist()
            single_final = [o[4].get("final_obs") for o in outs]
            for j in ended:
                assert torch.equal(info["final_obs"]["state"][j], single_final[j // 2]["state"][j % 2])
    assert saw_final  # 16 control steps against a 6-step deadline
    for e in singles:
        e.close()


def test_errors_name_the_problem(sharded):
    with pytest.raises(EnvError, match=r"num_envs=4"):
        sharded.step(torch.zeros(3, 4))
    for env_id, worker in ((3, 1), (0, 0)):
        bad = torch.zeros(4, 4)
        bad[env_id, 0] = float("nan")
        with pytest.raises(EnvError, match=f"NaN/inf.*env worker {worker}"):  # raised there, re-raised here
            sharded.step(bad)
        # the workers survive their errors and no reply of the failed call is left behind
        assert torch.equal(sharded.reset(seed=0)["state"], sharded.reset(seed=0)["state"])
        assert sharded.step(torch.zeros(4, 4))[0]["state"].shape == (4, 16)
    with pytest.raises(EnvError, match="valid tasks"):  # checked before any worker starts
        make_env("stack", 4, workers=2)
    with pytest.raises(EnvError, match="must divide"):
        sharded.reset_group(4)
    s = sharded.reset_group(2, seed=1)["state"]  # groups of identical starts, one per shard
    assert s[0].equal(s[1]) and s[2].equal(s[3]) and not s[0].equal(s[2])
    with pytest.raises(EnvError, match="cpu"):
        make_env("place", 4, backend="warp", workers=2)
    with pytest.raises(EnvError, match="workers must be >= 1"):
        make_env("place", 4, workers=0)
    with pytest.raises(EnvError, match="fewer than workers"):
        make_env("place", 1, workers=2)


def test_config_route_and_close():
    env = make_env_from_config(EnvConfig(task="lift", num_envs=3, workers=2, seed=0))
    assert env.shard_sizes == [2, 1] and env.reset()["state"].shape[0] == 3
    env.close()
    with pytest.raises(EnvError, match="closed"):
        env.reset()


def test_runner_trains_on_worker_envs_from_its_config(tmp_path):
    """`env: {task: place, workers: 2}` in a training config: the runner's env factory builds the
    multi-process env and a DPPO iteration runs on it (rollout, GAE with final_obs, update)."""
    from vla_rl.algos import DPPOConfig
    from vla_rl.envs.subproc import SubprocEnv
    from vla_rl.policy import VLAPolicy
    from vla_rl.policy.config import DiTConfig, NoiseConfig, PolicyConfig
    from vla_rl.runner import Runner, RunnerConfig, TrainConfig

    torch.manual_seed(0)
    pol = VLAPolicy(PolicyConfig(action_dim=4, state_dim=16, privileged_dim=12, horizon=4, exec_steps=4,
                                 language_encoder="hash", language_dim=16, language_buckets=64, fusion_layers=0,
                                 dit=DiTConfig(d_model=32, n_layers=1, n_heads=2),
                                 noise=NoiseConfig(train_steps=20, sample_steps=3, stochastic_steps=2),
                                 critic_hidden=[32]))
    cfg = TrainConfig(env={"task": "place", "workers": 2, "max_episode_steps": 8},
                      dppo=DPPOConfig(update_epochs=1, num_minibatches=1),
                      runner=RunnerConfig(iterations=1, num_envs=4, steps_per_iter=3, eval_every=0,
                                          log_dir=str(tmp_path / "run"), progress=False))
    r = Runner(cfg, policy=pol)
    try:
        assert isinstance(r.env, SubprocEnv)
        before = [p.detach().clone() for p in pol.head.parameters()]
        r.train()
        assert r.env_steps == 4 * 3 * 4
        assert any(not torch.equal(a, p) for a, p in zip(before, pol.head.parameters()))
    finally:
        r.env.close()


def test_a_dead_worker_is_named():
    env = make_env("lift", 2, workers=2)
    procs = list(env._procs)
    env._procs[1].kill()
    env._procs[1].join()
    with pytest.raises(EnvError, match="env worker 1 died"):
        env.reset()
    assert not any(p.is_alive() for p in procs)  # the surviving worker was shut down too
    with pytest.raises(EnvError, match="closed"):
        env.reset()
