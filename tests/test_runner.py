"""Runner: checkpoint/resume continues with identical state; TensorBoard scalars; evaluate's CI and slices."""

import json

import pytest

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vla_rl.algos import DPPOConfig, RWRConfig
from vla_rl.checkpoint import CheckpointError
from vla_rl.envs.toy import ToyGoalEnv
from vla_rl.evaluate import evaluate, wilson_interval
from vla_rl.policy import VLAPolicy
from vla_rl.runner import Runner, RunnerConfig, TrainConfig, train

from toy_utils import toy_policy_cfg

torch.set_num_threads(1)


def _cfg(tmp_path, iters, algo="dppo", resume=True):
    return TrainConfig(algo=algo, dppo=DPPOConfig(update_epochs=1, num_minibatches=2), rwr=RWRConfig(update_epochs=1),
                       runner=RunnerConfig(iterations=iters, num_envs=8, steps_per_iter=2, eval_every=2, eval_episodes=8,
                                           checkpoint_every=2, log_dir=str(tmp_path / "run"), resume=resume,
                                           progress=False))


def _policy():
    torch.manual_seed(0)
    return VLAPolicy(toy_policy_cfg(stochastic_steps=3))


def test_checkpoint_resume_and_tensorboard(tmp_path):
    run_dir = train(_cfg(tmp_path, 2), policy=_policy(), env=ToyGoalEnv(8))
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["iteration"] == 2 and state["algo"]["iteration"] == 2
    saved = VLAPolicy.from_pretrained(run_dir / "checkpoint" / "policy")
    # A fresh runner on a different initial policy resumes the saved state exactly.
    r = Runner(_cfg(tmp_path, 4), policy=_policy(), env=ToyGoalEnv(8))
    assert r.iteration == 2 and r.algo.iteration == 2 and r.env_steps == state["env_steps"]
    mine, theirs = r.policy.state_dict(), saved.state_dict()
    assert mine.keys() == theirs.keys() and any(k.startswith("early_head.") for k in mine)
    for k, a in mine.items():
        assert torch.equal(a, theirs[k]), k
    opt_state = r.algo.actor_opt.state_dict()["state"]  # 2 iterations x 2 minibatches
    assert len(opt_state) > 0 and all(int(s["step"]) == 4 for s in opt_state.values())
    # Saving the resumed runner reproduces the checkpoint it came from.
    r.save(tmp_path / "again")
    st2 = json.loads((tmp_path / "again" / "state.json").read_text())
    assert st2["optimizers"] == state["optimizers"] and st2["iteration"] == 2
    r.train()
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["iteration"] == 4

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for t in ["train/success_rate", "train/episode_return", "train/episode_length", "loss/policy_loss",
              "loss/value_loss", "train/approx_kl", "train/clip_frac", "train/explained_variance",
              "perf/env_steps_per_s", "perf/update_time", "eval/success_rate"]:
        assert t in tags, (t, tags)


def test_rwr_runs(tmp_path):
    run_dir = train(_cfg(tmp_path, 1, algo="rwr"), policy=_policy(), env=ToyGoalEnv(8))
    assert (run_dir / "checkpoint" / "optim.safetensors").is_file()


def test_rwr_advantage_weights_resume_their_critic_and_refuse_the_other_weighting(tmp_path):
    def cfg(iters, weights="advantage"):
        c = _cfg(tmp_path, iters, algo="rwr")
        c.rwr = RWRConfig(update_epochs=1, num_minibatches=1, weights=weights, critic_warmup=1, min_episodes=1)
        c.runner.steps_per_iter, c.runner.eval_every = 4, 0
        return c

    run_dir = train(cfg(2), policy=_policy(), env=ToyGoalEnv(8))
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["algo"]["critic_fits"] == 2 and "critic" in state["optimizers"]
    saved = VLAPolicy.from_pretrained(run_dir / "checkpoint" / "policy")
    r = Runner(cfg(3), policy=_policy(), env=ToyGoalEnv(8))
    assert r.algo.critic_fits == 2 and r.policy.cfg.critic_clock
    for k, v in saved.state_dict().items():
        if k.startswith("critic."):
            assert torch.equal(r.policy.state_dict()[k], v), k
    assert all(int(s["step"]) == 2 for s in r.algo.critic_opt.state_dict()["state"].values())  # 2 fits x 1 step
    r.writer.close()
    with pytest.raises(CheckpointError, match="rwr.weights: checkpoint 'advantage', now 'return'"):
        Runner(cfg(3, weights="return"), policy=_policy(), env=ToyGoalEnv(8))


def test_group_reset_and_evaluate():
    env = ToyGoalEnv(8)
    obs = env.reset_group(4, seed=3)
    assert torch.equal(obs["state"][0], obs["state"][3]) and not torch.equal(obs["state"][0], obs["state"][4])
    lo, hi = wilson_interval(5, 10)
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3
    ev = evaluate(_policy(), ToyGoalEnv(16), 32, seed=0, bins=2)
    assert ev["num_episodes"] == 32 and ev["success_ci95"][0] <= ev["success_rate"] <= ev["success_ci95"][1]
    assert sum(b["n"] for b in ev["by_factor"]["start_x"]) == 32


def test_critic_warmup_freezes_actor_and_group_advantage_runs(tmp_path):
    pol = _policy()
    cfg = _cfg(tmp_path, 1)
    cfg.dppo.n_critic_warmup_itr = 1
    cfg.runner.eval_every = 0
    r = Runner(cfg, policy=pol, env=ToyGoalEnv(8))
    actor0 = [p.detach().clone() for p in pol.actor_parameters()]
    critic0 = [p.detach().clone() for p in pol.critic.parameters()]
    buf, _ = r.collect()
    r.algo.update(buf)
    assert all(torch.equal(a, p) for a, p in zip(actor0, pol.actor_parameters()))
    assert not all(torch.equal(a, p) for a, p in zip(critic0, pol.critic.parameters()))
    # critic-free, group-relative advantages with envs reset in groups of identical starts
    cfg2 = _cfg(tmp_path / "g", 1)
    cfg2.dppo.advantage = "group"
    cfg2.runner.group_size = 4
    cfg2.runner.eval_every = 0
    r2 = Runner(cfg2, policy=_policy(), env=ToyGoalEnv(8))
    buf, _ = r2.collect()
    assert buf.data["group"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert "policy_loss" in r2.algo.update(buf)


def test_dppo_critic_reads_the_episode_clock(tmp_path):
    """DPPO's critic gets obs["episode_time"] = control steps used / time limit, counted per env by the runner
    (reset to 0 with each new episode), and V changes with it."""
    import torch

    from vla_rl.algos import DPPOConfig
    from vla_rl.envs.toy import ToyGoalEnv
    from vla_rl.policy import ObservationError
    from vla_rl.runner import Runner, RunnerConfig, TrainConfig

    from toy_utils import pretrain_toy

    policy = pretrain_toy(steps=5, seed=0)
    policy.cfg.exec_steps = 2  # two decisions per episode of 4 control steps
    cfg = TrainConfig(algo="dppo", dppo=DPPOConfig(update_epochs=1),
                      runner=RunnerConfig(iterations=1, num_envs=8, steps_per_iter=5, eval_every=0, checkpoint_every=0,
                                          log_dir=str(tmp_path), progress=False))
    runner = Runner(cfg, policy=policy, env=ToyGoalEnv(8, seed=0, max_episode_steps=4))
    assert policy.cfg.critic_clock and policy.critic.use_clock
    buf, _ = runner.collect()
    t = buf.data["obs"]["episode_time"]  # [T, N]
    done = (buf.data["terminated"] | buf.data["truncated"])
    assert torch.equal(t[0], torch.zeros(8))
    for step in range(1, 5):  # 0.5 after an unfinished first decision, 0 after any episode end
        want = torch.where(done[step - 1], torch.zeros(8), t[step - 1] + 0.5)
        assert torch.allclose(t[step], want), step
    obs = {"state": torch.zeros(2, 3), "instruction": ["go to the correct goal"] * 2}
    with torch.no_grad():
        torch.nn.init.normal_(policy.critic.net[0].weight)
        v = policy.value({**obs, "episode_time": torch.tensor([0.0, 1.0])})
    assert v[0] != v[1]
    with pytest.raises(ObservationError, match="episode_time"):
        policy.value(obs)
