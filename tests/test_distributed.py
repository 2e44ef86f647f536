"""Data-parallel RL and BC on torch.distributed (gloo, 2 CPU ranks started by the tests).

One spawn runs several phases in the same process group (process start-up is the expensive part): global
reductions; one DPPO and one RWR update on 2 ranks, compared with a single process's update on the
concatenated batch; rank-0-only checkpoints and TensorBoard; a 2-rank resume that reproduces an uninterrupted
run bit for bit; data-parallel BC with a distributed sampler. Then: a resume on another world size, config
refusals, a rank that hangs (the collective timeout ends the job), and ``torchrun -m vla_rl.cli train`` with
a rank that raises (restarted once, resumed from the checkpoint, then the job ends with that rank's error).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vla_rl import distributed
from vla_rl.envs.toy import ToyGoalEnv

# The rest of the library is imported inside the functions that use it: the processes spawned for the
# failure tests import this module, and start faster without it.

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def _policy():
    from vla_rl.policy import VLAPolicy

    from toy_utils import toy_policy_cfg

    torch.manual_seed(0)
    return VLAPolicy(toy_policy_cfg(stochastic_steps=3))


def _dppo_cfg(**kw):
    # one minibatch = the whole batch, so a single process's update on the concatenated batch visits the same
    # rows in each step; two epochs make the second step depend on the first's Adam state
    from vla_rl.algos import DPPOConfig

    return DPPOConfig(update_epochs=2, num_minibatches=1, **kw)


def _row_seeded_noise(policy):
    """RWR regresses with the denoising loss, which draws noise for each row; drawn here from a seed that is a
    function of the row, so that 2 ranks and one process draw the same noise for the same decision."""
    draw = policy.noise.training_target

    def training_target(x0, generator=None):
        rows = [draw(x0[i:i + 1], torch.Generator(x0.device).manual_seed(int(x0[i].abs().sum() * 1e6) % 2**31))
                for i in range(len(x0))]
        return tuple(torch.cat(parts) for parts in zip(*rows))

    policy.noise.training_target = training_target


def _rwr_cfg(algo="rwr"):
    """``rwr_adv``: advantage weights from a critic that fits on the same global minibatches (no warm-up, so one
    update moves both)."""
    from vla_rl.algos import RWRConfig

    adv = {"weights": "advantage", "critic_warmup": 0} if algo == "rwr_adv" else {}
    return RWRConfig(update_epochs=2, num_minibatches=1, min_episodes=1, skip_constant=False, lr=1e-3, **adv)


def _train_cfg(log_dir, iterations, **runner):
    from vla_rl.runner import RunnerConfig, TrainConfig

    return TrainConfig(algo="dppo", dppo=_dppo_cfg(),
                       runner=RunnerConfig(**{"iterations": iterations, "num_envs": 8, "steps_per_iter": 2,
                                              "eval_every": 2, "eval_episodes": 6, "checkpoint_every": 2,
                                              "log_dir": str(log_dir), "progress": False, **runner}))


def _same_on_all_ranks(module) -> bool:
    sums = distributed.gather_objects([float(p.double().sum()) for p in module.state_dict().values()])
    return all(s == sums[0] for s in sums)


# ---------------------------------------------------------------------------------------------- rank code
def _phases(tmp: str) -> None:
    from vla_rl.policy import VLAPolicy
    from vla_rl.runner import Runner

    from toy_utils import toy_policy_cfg

    tmp = Path(tmp)
    ctx = distributed.setup("cpu")
    rank = ctx.rank
    assert ctx.world_size == WORLD and distributed.enabled()

    # 1) global reductions: rank-dependent data, compared with the concatenation
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(5 + 2 * rank, generator=g) * (1 + 2 * rank) + 5 * rank
    full = torch.cat(distributed.gather_objects(x))
    mean, std = distributed.mean_std(x)
    assert torch.allclose(mean, full.mean(), atol=1e-6) and torch.allclose(std, full.std(), atol=1e-6)
    assert not torch.allclose(std, x.std(), atol=1e-3)  # the local statistic is not the global one
    m, v, n = distributed.moments(x)
    assert n == full.numel() and abs(m - full.mean().item()) < 1e-6 and abs(v - full.var(unbiased=False).item()) < 1e-5
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), float(rank + 1))
    q = torch.nn.Parameter(torch.zeros(2))  # no gradient on rank 0: counts as zero there
    q.grad = None if rank == 0 else torch.ones(2)
    distributed.average_gradients([p, q])
    assert torch.allclose(p.grad, torch.full((3,), 1.5)) and torch.allclose(q.grad, torch.full((2,), 0.5))

    # 2) one DPPO and one RWR update on 2 ranks (4 envs each); the parent test repeats them in one process on 8
    for algo in ("dppo", "rwr", "rwr_adv"):
        cfg = _train_cfg(tmp / algo, 1, eval_every=0, checkpoint_every=0)
        cfg.algo, cfg.rwr = algo.removesuffix("_adv"), _rwr_cfg(algo)
        runner = Runner(cfg, policy=_policy(), env=ToyGoalEnv(4, seed=rank))
        _row_seeded_noise(runner.policy)
        assert runner.env.num_envs == 4 and runner.seed == distributed.rank_seed(0, rank)
        assert _same_on_all_ranks(runner.policy)  # rank 0's randomly initialized critic was broadcast
        init = {k: v.clone() for k, v in runner.policy.state_dict().items()}
        buf, _ = runner.collect()
        stats = runner.algo.update(buf)
        assert _same_on_all_ranks(runner.policy)
        torch.save({"data": buf.data, "instructions": buf.instructions}, tmp / f"{algo}_buf{rank}.pt")
        if rank == 0:
            torch.save({"init": init, "after": runner.policy.state_dict(), "stats": stats}, tmp / f"{algo}_update.pt")
        states = distributed.gather_objects(runner.env.pos.tolist())
        assert states[0] != states[1]  # the ranks' envs draw different starts
        runner.writer.close()

    # DSRL: every rank's replay holds its own envs' decisions; the ranks take the same gradient steps (counted
    # from all ranks' decisions) on batch_size / 2 each and stay identical
    from vla_rl.algos import DSRLConfig

    cfg = _train_cfg(tmp / "dsrl", 2, eval_every=0, checkpoint_every=0, steps_per_iter=4)
    cfg.algo = "dsrl"
    cfg.dsrl = DSRLConfig(actor_hidden=[16], critic_hidden=[16], batch_size=8, learning_starts=8, utd=0.5,
                          buffer_size=256)
    runner = Runner(cfg, policy=_policy(), env=ToyGoalEnv(4, seed=rank))
    assert _same_on_all_ranks(runner.algo.critics) and _same_on_all_ranks(runner.policy.noise_actor)
    runner.train()
    assert runner.algo.decisions == 2 * 4 * 8 and runner.algo.grad_steps == 0.5 * 64  # utd x all ranks' decisions
    assert runner.algo.replay.size == 2 * 4 * 4  # this rank's own decisions
    assert _same_on_all_ranks(runner.algo.critics) and _same_on_all_ranks(runner.policy.noise_actor)
    assert distributed.gather_objects(runner.algo.log_alpha.item())[0] == runner.algo.log_alpha.item()
    assert runner.algo.log_alpha.item() != torch.tensor(cfg.dsrl.init_alpha).log().item()  # it was trained
    cfg.runner.iterations = 3  # resumed: rank 0 gets its replay back from the checkpoint, rank 1 refills its own
    resumed = Runner(cfg, policy=_policy(), env=ToyGoalEnv(4, seed=rank))
    assert resumed.algo.decisions == 64 and resumed.algo.replay.size == (32 if rank == 0 else 0)
    assert _same_on_all_ranks(resumed.algo.critics) and _same_on_all_ranks(resumed.algo.targets)
    resumed.train()
    assert resumed.algo.grad_steps == 32 + 16 and _same_on_all_ranks(resumed.policy.noise_actor)

    # 3) uninterrupted 4 iterations, and 2 iterations + a resume to 4: checkpoints and TensorBoard by rank 0
    Runner(_train_cfg(tmp / "full", 4), policy=_policy()).train()
    Runner(_train_cfg(tmp / "part", 2), policy=_policy()).train()
    resumed = Runner(_train_cfg(tmp / "part", 4), policy=_policy())
    assert resumed.iteration == 2 and resumed.algo.iteration == 2 and _same_on_all_ranks(resumed.policy)
    resumed.train()

    # 4) data-parallel BC: a distributed sampler splits each epoch's demos between the ranks
    from vla_rl.pretrain import PretrainConfig, pretrain

    pcfg = PretrainConfig(data=str(tmp / "demos"), out=str(tmp / "bc"), steps=4, batch_size=8, warmup_steps=1,
                          log_every=2, save_every=100, progress=False,
                          policy=toy_policy_cfg())
    pcfg.policy.language_encoder = "hash"
    seen, bc_loss = [], VLAPolicy.bc_loss

    def recording(self, obs, *args, **kwargs):  # the demo rows (by their states) each step trains on
        seen.append(sorted(tuple(round(v, 5) for v in row) for row in obs["state"].tolist()))
        return bc_loss(self, obs, *args, **kwargs)

    VLAPolicy.bc_loss = recording
    try:
        out = pretrain(pcfg)
    finally:
        VLAPolicy.bc_loss = bc_loss
    batches = distributed.gather_objects(seen)
    assert len(batches[0]) == len(batches[1]) == 4
    for mine, theirs in zip(batches[0], batches[1]):
        assert len(mine) == len(theirs) == 4 and not set(mine) & set(theirs)  # disjoint halves of a global batch
    assert out == Path(pcfg.out) and (out / "model.safetensors").is_file()  # written by rank 0 before any returns
    distributed.barrier()


def _demos(path):
    import numpy as np

    from vla_rl.data import EpisodeWriter

    rng = np.random.default_rng(0)
    with EpisodeWriter(path) as w:
        for i in range(6):
            t = 6
            w.add_episode({"state": rng.normal(size=(t, 3))}, rng.normal(size=(t, 2)) * 0.1,
                          instruction="go to the correct goal", success=True)


def _ckpt_policy(run: Path) -> dict:
    return load_file(str(run / "checkpoint" / "policy" / "model.safetensors"))


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    _demos(tmp / "demos")
    t0 = time.perf_counter()
    distributed.spawn(_phases, WORLD, str(tmp))
    print(f"2-rank phases took {time.perf_counter() - t0:.1f} s")
    return tmp


def _concatenated(spawned, algo):
    """The 2 ranks' rollouts as one [T, 8] buffer (rank 0's envs, then rank 1's), and rank 0's saved update."""
    from vla_rl.rollout import RolloutBuffer

    saved = torch.load(spawned / f"{algo}_update.pt", weights_only=False)
    bufs = [torch.load(spawned / f"{algo}_buf{r}.pt", weights_only=False) for r in range(WORLD)]
    buf = RolloutBuffer(2, 8)
    buf.data = torch.cat([b["data"] for b in bufs], 1)
    buf.instructions = [sum((b["instructions"][t] for b in bufs), []) for t in range(2)]
    return saved, bufs, buf


@pytest.mark.parametrize("algo", ["dppo", "rwr", "rwr_adv"])
def test_one_update_equals_single_process_on_concatenated_batch(spawned, algo):
    from vla_rl.algos import DPPO, RWR

    saved, _, buf = _concatenated(spawned, algo)
    policy = _policy()
    learner = DPPO(policy, _dppo_cfg()) if algo == "dppo" else RWR(policy, _rwr_cfg(algo))
    policy.load_state_dict(saved["init"])
    _row_seeded_noise(policy)
    stats = learner.update(buf)
    after = policy.state_dict()
    moved = 0
    for k, v in saved["after"].items():
        assert torch.allclose(after[k], v, atol=1e-5, rtol=0), k
        moved += int(not torch.equal(v, saved["init"][k]))
    assert moved > 0  # the update changed weights (the comparison is not between two untouched copies)
    keys = ("policy_loss", "value_loss", "approx_kl", "explained_variance") if algo == "dppo" else \
        ("policy_loss", "decisions", "episodes_ready", "weight_max", "weight_mean", "return_mean")
    if algo == "rwr_adv":
        keys += ("value_loss", "explained_variance", "advantage_std")
        assert any(k.startswith("critic.") and not torch.equal(v, saved["init"][k]) for k, v in saved["after"].items())
    for k in keys:
        assert abs(stats[k] - saved["stats"][k]) < 1e-5, (k, stats[k], saved["stats"][k])


def test_global_advantage_normalization(spawned):
    """Local normalization would give a different update: the ranks' advantages differ in mean and spread."""
    from vla_rl.algos import DPPO
    from vla_rl.rollout import RolloutBuffer

    saved, bufs, buf = _concatenated(spawned, "dppo")
    policy = _policy()
    algo = DPPO(policy, _dppo_cfg())
    policy.load_state_dict(saved["init"])
    advs = []
    for b in bufs:  # each rank's half normalized on its own, gradients averaged: what a naive data-parallel does
        one = RolloutBuffer(2, 4)
        one.data, one.instructions = b["data"], b["instructions"]
        advs.append(algo.compute_advantages(one)[0])
    assert not torch.allclose(advs[0].mean(), advs[1].mean(), atol=1e-4) or \
        not torch.allclose(advs[0].std(), advs[1].std(), atol=1e-4)
    flat = buf.flatten(*algo.compute_advantages(buf))
    idx = torch.arange(flat["n"])

    def pg_grad(rows):  # gradient of the clipped surrogate on these rows (advantages normalized over them)
        algo.actor_opt.zero_grad(set_to_none=True)
        algo.loss(buf.index_obs(flat, rows), flat["chain"][rows], flat["log_prob"][rows], flat["adv"][rows],
                  flat["ret"][rows], flat["value"][rows])[1].backward()
        return torch.cat([p.grad.flatten() for p in algo.actor_params if p.grad is not None])

    glob = pg_grad(idx)  # the concatenated batch, normalized with the global statistics (= the 2-rank update)
    rows = idx.view(2, 8)  # [T, N] of the flattened batch: rank 0's envs are columns 0-3
    local = (pg_grad(rows[:, :4].flatten()) + pg_grad(rows[:, 4:].flatten())) / 2  # each half normalized alone
    assert (glob - local).norm() > 1e-3 * glob.norm()  # so the equality test above would catch local normalization


def test_rank0_alone_writes_checkpoint_and_tensorboard(spawned):
    for run in ("full", "part"):
        d = spawned / run
        assert sorted(p.name for p in d.iterdir()) == ["checkpoint", "tb"], list(d.iterdir())  # no leftovers
        events = [p.name for p in (d / "tb").iterdir()]
        assert len({e.rsplit(".", 2)[1] for e in events}) == 1, events  # one writer process: rank 0 (one file per run)
        assert len(events) == (1 if run == "full" else 2), events
        state = json.loads((d / "checkpoint" / "state.json").read_text())
        assert state["iteration"] == 4 and state["world_size"] == WORLD and len(state["ranks"]) == WORLD
        assert state["env_steps"] == 4 * 2 * 8 * 4  # iterations x steps x all ranks' envs x exec_steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((spawned / "full" / "tb").iterdir())))
    acc.Reload()
    assert [e.value for e in acc.Scalars("eval/episodes")] == [6.0, 6.0]  # 3 per rank, gathered
    assert "train/approx_kl" in acc.Tags()["scalars"] and "perf/env_steps_per_s" in acc.Tags()["scalars"]
    # the unbiased success rate counts one episode per env of *both* ranks, once both have finished them
    counts = [e.value for e in acc.Scalars("train/success_rate_episodes")]
    assert counts and all(c == 8 for c in counts), counts


def test_resume_reproduces_an_uninterrupted_run(spawned):
    full, part = _ckpt_policy(spawned / "full"), _ckpt_policy(spawned / "part")
    assert full.keys() == part.keys()
    for k in full:
        assert torch.equal(full[k], part[k]), k
    assert (spawned / "bc" / "model.safetensors").is_file()


def test_changed_world_size_resumes_in_one_process(spawned, tmp_path, capsys):
    import shutil

    from vla_rl.runner import Runner

    shutil.copytree(spawned / "part", tmp_path / "run")
    r = Runner(_train_cfg(tmp_path / "run", 5), policy=_policy(), env=ToyGoalEnv(8))
    assert r.iteration == 4 and "written by 2 processes" in capsys.readouterr().err
    r.train()
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["iteration"] == 5


def test_config_checks_name_the_problem(tmp_path):
    from vla_rl.config import ConfigError
    from vla_rl.runner import check_distributed

    cfg = _train_cfg(tmp_path, 1, num_envs=7)
    with pytest.raises(ConfigError, match="num_envs=7 must be divisible by the number of processes"):
        check_distributed(cfg, 2)
    cfg = _train_cfg(tmp_path, 1, group_size=4, num_envs=4)
    with pytest.raises(ConfigError, match="group_size=4 must divide each rank's 2 envs"):
        check_distributed(cfg, 2)
    cfg = _train_cfg(tmp_path, 1)
    cfg.algo = "dsrl"
    cfg.dsrl.batch_size = 5
    with pytest.raises(ConfigError, match="dsrl.batch_size=5 must be divisible by the number of processes"):
        check_distributed(cfg, 2)


# ---------------------------------------------------------------------------------------------- failure
def _hanging_rank() -> None:
    ctx = distributed.setup("cpu")
    if ctx.rank == 1:
        time.sleep(120)  # stuck (a simulator that never returns): never reaches the collective
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    distributed.average_gradients([p])


def test_hanging_rank_ends_the_job_after_the_collective_timeout(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "2")
    t0 = time.perf_counter()
    with pytest.raises(Exception, match=r"rank 0/2: the gradient all-reduce did not complete.*VLA_RL_DIST_TIMEOUT=2"):
        distributed.spawn(_hanging_rank, WORLD)
    assert time.perf_counter() - t0 < 60


class _Failing(ToyGoalEnv):
    def step(self, action):
        self.calls = getattr(self, "calls", 0) + 1
        # First attempt: in iteration 3 (after the checkpoint of iteration 2); the restart resumes at iteration 2
        # and fails in iteration 4, after logging iteration 3.
        fail_at = 5 if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" else 3
        if os.environ.get("RANK") == "1" and self.calls == fail_at:
            raise RuntimeError("rank 1: the simulator exploded")
        return super().step(action)


def failing_env(num_envs, device="cpu", seed=None):
    """``test_distributed:failing_env``: rank 1's env raises in every attempt of the job."""
    return _Failing(num_envs, device=device, seed=seed or 0)


def test_failing_rank_ends_the_job_with_its_error_after_a_resumed_restart(tmp_path):
    """``torchrun --max-restarts 1 -m vla_rl.cli train``: rank 1 raises; the elastic agent stops rank 0 and
    restarts both, which resume from rank 0's last checkpoint (a fresh rendezvous: the previous attempt's peer
    addresses are not reused); rank 1 raises again and the job ends, within a bounded time, with its error."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _policy().save_pretrained(tmp_path / "pol")
    (tmp_path / "train.yaml").write_text(
        f"policy_path: {tmp_path / 'pol'}\nenv: {{task: 'test_distributed:failing_env'}}\nalgo: dppo\n"
        f"runner: {{iterations: 50, num_envs: 4, steps_per_iter: 2, eval_every: 0, checkpoint_every: 1, "
        f"log_dir: {tmp_path / 'run'}, progress: false}}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "30"}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc-per-node={WORLD}",
           "--max-restarts=1", "-m", "vla_rl.cli", "train", str(tmp_path / "train.yaml"), "dppo.update_epochs=1"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    elapsed = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and elapsed < 90, (elapsed, out)
    summary = out[out.index("Root Cause"):]  # torchrun's failure summary names the rank and its exception
    assert "rank      : 1" in summary and "rank 1: the simulator exploded" in summary, summary
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["iteration"] == 3
    first_steps = []
    for events in sorted((tmp_path / "run" / "tb").iterdir()):  # one file per attempt, written by rank 0
        acc = EventAccumulator(str(events))
        acc.Reload()
        first_steps.append(acc.Scalars("perf/env_steps_per_s")[0].step)
    assert len(first_steps) == 2 and first_steps[1] == 3 * first_steps[0]  # the restart went on from iteration 3
