"""On-policy runner used by DPPO and RWR: collect -> update -> log -> evaluate -> checkpoint, resumable.

Checkpoint layout (``<log_dir>/checkpoint``, written atomically; a crash leaves the last good one)::

    policy/            VLAPolicy.save_pretrained
    optim.safetensors  optimizer tensors (keys "<opt>/<param index>/<name>")
    state.json         iteration, env steps, optimizer scalars/param groups, algorithm state, RNG
    checksums.json     sha256 of every file above (a corrupt file is a named CheckpointError on resume)

Whether a run resumes is decided before any work (``vla_rl.resume``): an existing checkpoint is resumed
only if it is whole and written by the same run, and is never overwritten by a run started from zero
(``resume=False`` keeps it as ``checkpoint.before-<time>``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from vla_rl import distributed
from vla_rl.algos import DPPO, DSRL, RWR, DPPOConfig, DSRLConfig, RWRConfig
from vla_rl.checkpoint import CheckpointError, write_dir_atomically
from vla_rl.config import ConfigError, check_values
from vla_rl.evaluate import evaluate
from vla_rl.policy import VLAPolicy
from vla_rl.resume import check_policy_overrides, open_checkpoint, resume_state
from vla_rl.rollout import RolloutBuffer
from vla_rl.train_monitor import DivergenceWatch, EpisodeOutcomes


@dataclass
class RunnerConfig:
    iterations: int = 100
    num_envs: int = 32
    steps_per_iter: int = 4  # decisions (action chunks) per env per iteration
    eval_every: int = 10  # 0 = never
    eval_episodes: int = 64
    checkpoint_every: int = 10  # 0 = only at the end
    seed: int = 0
    log_dir: str = "runs/rl"
    device: str = "cpu"
    resume: bool = True  # continue from <log_dir>/checkpoint if present (False: keep it aside, start fresh)
    group_size: int = 0  # >0: envs reset in groups with identical starts (GRPO), needs env.reset_group
    progress: bool = True
    # Stop with an error when more than half of the envs diverge (info["unstable"]) in this many iterations
    # in a row; 0 = never stop.
    max_unstable_iters: int = 3


@dataclass
class TrainConfig:
    policy_path: str = ""
    # patches of the loaded policy's config that do not change the weights, e.g.
    # {"noise": {"stochastic_steps": 5, "std_floor": 0.1}} (see VLAPolicy.from_pretrained)
    policy_overrides: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)  # passed to the env factory: {"task": ..., **kwargs}
    algo: str = "dppo"  # "dppo" | "rwr" | "dsrl"
    dppo: DPPOConfig = field(default_factory=DPPOConfig)
    rwr: RWRConfig = field(default_factory=RWRConfig)
    dsrl: DSRLConfig = field(default_factory=DSRLConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)


def make_algo(name: str, policy, cfg: TrainConfig):
    if name == "dppo":
        return DPPO(policy, cfg.dppo)
    if name == "rwr":
        return RWR(policy, cfg.rwr)
    if name == "dsrl":
        return DSRL(policy, cfg.dsrl)
    raise ValueError(f"algo must be 'dppo', 'rwr' or 'dsrl', got {name!r}")


def _default_env_factory(env_cfg: dict, num_envs: int, device: str):
    env_cfg = dict(env_cfg)
    task = env_cfg.pop("task", "toy")
    if task == "toy":
        from vla_rl.envs.toy import ToyGoalEnv
        env_cfg.pop("workers", None)  # only 1 passes the config rules: the toy steps in this process
        return ToyGoalEnv(num_envs, device=device, **env_cfg)
    from vla_rl.envs import make_env_from_config  # task: a built-in name, gym:<id> or module:factory
    return make_env_from_config({**env_cfg, "task": task, "num_envs": num_envs, "device": device})


class Runner:
    def __init__(self, cfg: TrainConfig, policy=None, env=None, eval_env=None, env_factory=None):
        rc = cfg.runner
        self.cfg, self.rc = cfg, rc
        check_values(cfg)  # every value, before anything is loaded or written
        if policy is None:
            check_policy_overrides(cfg.policy_path, cfg.policy_overrides)
        # Several ranks when launched by torchrun (or vla_rl.distributed.spawn); nothing is initialized for one.
        self.dist = distributed.setup(rc.device)
        self.world, self.rank = self.dist.world_size, self.dist.rank
        if self.world > 1:
            check_distributed(cfg, self.world)
        self.device = self.dist.device(rc.device)  # cuda -> cuda:<local rank>
        self.seed = distributed.rank_seed(rc.seed, self.rank)  # rank 0: rc.seed itself
        self.log_dir = Path(rc.log_dir)
        self.ckpt_dir = self.log_dir / "checkpoint"
        # Rank 0 alone reads the checkpoint directory (and may set it aside); a refusal is raised on every rank.
        resume = distributed.on_main(resume_state, self.ckpt_dir, cfg)  # refuses a checkpoint it must neither resume nor overwrite
        torch.manual_seed(self.seed)
        factory = env_factory or _default_env_factory
        self.policy = policy if policy is not None else VLAPolicy.from_pretrained(
            cfg.policy_path, device=self.device, **dict(cfg.policy_overrides))
        local_envs = rc.num_envs // self.world
        if env is None:
            self.env = factory(_rank_env_cfg(cfg.env, self.rank) if self.world > 1 else cfg.env, local_envs, self.device)
        else:
            self.env = env
            if self.world > 1 and env.num_envs != local_envs:
                raise ConfigError(f"rank {self.rank}: the env given steps {env.num_envs} envs, but runner.num_envs="
                                  f"{rc.num_envs} over {self.world} ranks gives each rank {local_envs}")
        self.eval_env = eval_env if eval_env is not None else self.env
        if rc.group_size > 0 and not hasattr(self.env, "reset_group"):
            raise ValueError(f"runner.group_size={rc.group_size} needs an env with reset_group(); "
                             f"{type(self.env).__name__} has none (set runner.group_size=0: the group "
                             "advantage then uses a per-instruction baseline)")
        self.algo = make_algo(cfg.algo, self.policy, cfg)
        self.iteration, self.env_steps = 0, 0
        if resume is not None:
            distributed.on_main(self.load, self.ckpt_dir, resume)
            if self.world == 1 and resume.get("world_size", 1) != 1:
                print(f"resuming {self.ckpt_dir} (written by {resume['world_size']} processes) in one process: weights, "
                      "optimizer and algorithm state are restored exactly; the random streams continue rank 0's",
                      file=sys.stderr)
        if self.world > 1:
            self._sync_from_main(resume)
        self.outcomes = EpisodeOutcomes(self.env.num_envs)
        self.divergence = DivergenceWatch(self.env.num_envs, rc.max_unstable_iters, total_envs=self.env.num_envs * self.world)
        self._pending_outcomes: dict[int, list] = {}  # iteration -> [successes, episodes, spoiled, ranks reported]
        self.writer = SummaryWriter(str(self.log_dir / "tb")) if self.rank == 0 else _NoWriter()
        self.gen = torch.Generator(device=self.policy.device).manual_seed(self.seed + 7919 * self.iteration)
        if getattr(self, "_gen_state", None) is not None:
            self.gen.set_state(self._gen_state)
        self.obs = self._reset(self.seed + self.iteration)

    def _sync_from_main(self, resume: dict | None) -> None:
        """Every rank starts from rank 0's weights, optimizer and algorithm state (fresh: the randomly initialized
        critic; resumed: what rank 0 read from the checkpoint, so the other ranks need no access to it), and
        from its own RNG streams: those it saved, or fresh ones derived from the global seed when the world size
        changed since the checkpoint."""
        distributed.broadcast_module(self.policy)
        for module in (getattr(self.algo, "critics", None), getattr(self.algo, "targets", None)):  # DSRL's
            if module is not None:
                distributed.broadcast_module(module)
        if getattr(self.algo, "log_alpha", None) is not None:
            distributed.broadcast_tensor(self.algo.log_alpha)
        main = self.rank == 0
        # Moved to the CPU first: pickled CUDA tensors would be rebuilt on rank 0's GPU in every receiving rank.
        opts = distributed.broadcast_object({n: _cpu(o.state_dict()) for n, o in self.algo.optimizers().items()}
                                            if main else None)
        extra = distributed.broadcast_object(self.algo.extra_state() if main else None)
        if not main:
            for n, o in self.algo.optimizers().items():
                o.load_state_dict(opts[n])
            self.algo.load_extra_state(extra)
            if hasattr(self.algo, "gen"):  # DSRL's replay sampler: rank 0's state, then this rank's own stream
                self.algo.gen.manual_seed(self.seed + 7919 * self.iteration)
        self.iteration, self.env_steps = distributed.broadcast_object((self.iteration, self.env_steps))
        if resume is None:
            return
        ranks, saved_world = resume.get("ranks"), resume.get("world_size", 1)
        if isinstance(ranks, list) and saved_world == self.world and len(ranks) == self.world:
            torch.set_rng_state(torch.tensor(ranks[self.rank]["torch_rng"], dtype=torch.uint8))
            self._gen_state = torch.tensor(ranks[self.rank]["gen_rng"], dtype=torch.uint8)
            return
        # Weights, optimizer, algorithm state, iteration and env steps are global and restored exactly; only the
        # per-rank random streams and env seeds cannot carry over to another world size: re-derived from the seed.
        torch.manual_seed(self.seed + 7919 * self.iteration)
        self._gen_state = None
        if self.rank == 0:
            print(f"resuming {self.ckpt_dir} (written by {saved_world} process(es)) on {self.world}: weights, "
                  "optimizer and algorithm state are restored exactly; each rank's random streams and env seeds are "
                  "derived anew from runner.seed (the run continues correctly, not bit-identically)", file=sys.stderr)

    def _reset(self, seed):
        self.clock = torch.zeros(self.env.num_envs)  # control steps into each env's episode
        self.outcomes.abandon()  # the episodes in progress are cut short
        getattr(self.algo, "on_env_reset", lambda: None)()  # so are an episode-based algorithm's (RWR)
        if self.rc.group_size > 0:
            return self.env.reset_group(self.rc.group_size, seed=seed)
        return self.env.reset(seed=seed)

    # ------------------------------------------------------------------ collect
    @torch.no_grad()
    def collect(self) -> tuple[RolloutBuffer, dict]:
        rc, pol, env = self.rc, self.policy, self.env
        buf = RolloutBuffer(rc.steps_per_iter, env.num_envs, device="cpu")
        ep = {"success": [], "return": [], "length": []}
        group = torch.arange(env.num_envs) // max(rc.group_size, 1) if rc.group_size > 0 else None
        if group is None and self.cfg.algo == "dppo" and self.cfg.dppo.advantage == "group":
            names = {}  # per-instruction baseline when envs cannot be reset in groups
            group = torch.tensor([names.setdefault(s, len(names)) for s in self.obs["instruction"]])
        t0 = time.perf_counter()
        use_v = getattr(self.algo, "uses_critic", False)
        timed = self._timed if pol.cfg.critic_clock else (lambda o, _clock: o)
        n_exec = 0
        # V(next obs) of one step is V(obs) of the next: the critic runs once per observation.
        value = pol.value(timed(self.obs, self.clock)) if use_v else torch.zeros(env.num_envs)
        deterministic = getattr(self.algo, "deterministic_rollouts", False)  # RWR's ODE sampling
        for _ in range(rc.steps_per_iter):
            obs = timed(self.obs, self.clock)
            chain = pol.sample(obs, deterministic=deterministic, generator=self.gen)
            nobs, reward, term, trunc, info = env.step(chain.actions[:, :pol.cfg.exec_steps])
            executed = info["steps_executed"].cpu().float()
            done = (term | trunc).cpu()
            clock_next = torch.where(done, torch.zeros_like(self.clock), self.clock + executed)
            value_nobs = pol.value(timed(nobs, clock_next)) if use_v else torch.zeros(env.num_envs)
            next_value = value_nobs
            if use_v and trunc.any() and "final_obs" in info:
                fv = pol.value(timed(info["final_obs"], self.clock + executed))
                next_value = torch.where(trunc.to(fv.device), fv, next_value)
            unstable = info.get("unstable", torch.zeros_like(trunc)).cpu() & trunc.cpu()
            if use_v and unstable.any():  # diverged env: outcome unknown, TD error ~0 (see DPPOConfig)
                next_value = torch.where(unstable.to(value.device), value, next_value)
            buf.add(obs, chain, reward.cpu(), term.cpu(), trunc.cpu(), value.cpu(), next_value.cpu(), group,
                    unstable)
            n_exec += self._record_episodes(info, done, ep)
            self.obs, value, self.clock = nobs, value_nobs, clock_next
        if rc.group_size > 0:  # each iteration starts fresh groups of identical starts
            self.obs = self._reset(self.seed + 1000003 * (self.iteration + 1))
            buf.episodes_cut = True
        buf.finalize()
        dt = time.perf_counter() - t0
        self.env_steps += rc.steps_per_iter * env.num_envs * pol.cfg.exec_steps * self.world  # all ranks' envs
        return buf, {"rollout_time": dt, "env_steps_per_s": n_exec / max(dt, 1e-9), "n_exec": n_exec, **ep}

    def _record_episodes(self, info: dict, done: torch.Tensor, ep: dict) -> int:
        """Append the outcome, return and length of the episodes that ended; returns control steps executed."""
        success = info["success"].cpu()
        self.outcomes.record(done, success)
        self.divergence.record(info, done)
        ep["success"] += success[done].float().tolist()
        ep["return"] += info["episode_return"].cpu()[done].tolist()
        ep["length"] += info["episode_length"].cpu()[done].float().tolist()
        return int(info["steps_executed"].sum())

    def _timed(self, obs: dict, clock: torch.Tensor) -> dict:
        """``obs`` plus ``episode_time``: the fraction of the env's time limit each episode has used."""
        return {**obs, "episode_time": (clock / self._time_limit()).to(obs["state"].device)}

    def _time_limit(self) -> float:
        return float(getattr(getattr(self.env, "spec", None), "max_episode_steps", 0) or 100)

    @torch.no_grad()
    def collect_off_policy(self) -> tuple[dict, dict]:
        """Off-policy algorithms (DSRL): act, store each decision in the algorithm's replay buffer and take
        the gradient steps it owes after every decision (as SB3's ``train_freq=1``)."""
        rc, pol, env, algo = self.rc, self.policy, self.env, self.algo
        ep = {"success": [], "return": [], "length": []}
        t0, n_exec, update_time, logs = time.perf_counter(), 0, 0.0, {}
        limit = self._time_limit()
        # The last call's next observation is this call's first: reuse its tokens (the steered base is frozen).
        cached = getattr(self, "_cond_cache", None)
        cond = cached[1] if cached is not None and cached[0] is self.obs else pol.encode(self.obs)
        for _ in range(rc.steps_per_iter):
            obs = self.obs
            actions, w, feats = algo.act(obs, cond, generator=self.gen)
            nobs, reward, term, trunc, info = env.step(actions[:, :pol.cfg.exec_steps])
            done, executed = (term | trunc).cpu(), info["steps_executed"].cpu().float()
            next_cond = pol.encode(nobs)
            last_obs, last_feats = nobs, next_cond.flatten(1)
            if done.any():  # an ended episode's next state is its final observation, not the reset one
                final = info["final_obs"]
                fin_feats = pol.encode(final).flatten(1)
                last_feats = torch.where(done.to(last_feats.device)[:, None], fin_feats, last_feats)
                if algo.cfg.critic_privileged:
                    m = done.to(final["privileged"].device)[:, None]
                    last_obs = {**nobs, "privileged": torch.where(m, final["privileged"], nobs["privileged"])}
            # A diverged env's outcome is unknown: its decision is not stored.
            keep = ~(info.get("unstable", torch.zeros_like(trunc)).cpu() & trunc.cpu())
            # With the clock in the critics' input the time limit ends the return like success does; without
            # it the state is not Markov in time, so a truncation bootstraps from the final observation.
            terminal = done if algo.cfg.critic_clock else term.cpu()
            extra = algo.critic_extra(obs, self.clock / limit)
            next_extra = algo.critic_extra(last_obs, (self.clock + executed) / limit)
            rows = keep.nonzero().flatten()
            algo.observe(feats[rows], extra[rows], w[rows], reward.cpu()[rows], last_feats[rows], next_extra[rows],
                         terminal[rows])
            self.clock = torch.where(done, torch.zeros_like(self.clock), self.clock + executed)
            n_exec += self._record_episodes(info, done, ep)
            self.obs, cond = nobs, next_cond
            tu = time.perf_counter()
            with torch.enable_grad():
                for k, v in algo.update().items():
                    logs.setdefault(k, []).append(v)
            update_time += time.perf_counter() - tu
        self._cond_cache = (self.obs, cond)
        dt = time.perf_counter() - t0
        self.env_steps += rc.steps_per_iter * env.num_envs * pol.cfg.exec_steps * self.world  # all ranks' envs
        stats = {k: sum(v) / len(v) for k, v in logs.items()}
        stats["update_time"] = update_time
        return stats, {"rollout_time": dt - update_time, "env_steps_per_s": n_exec / max(dt, 1e-9), "n_exec": n_exec,
                       **ep}

    # ------------------------------------------------------------------ loop
    def train(self) -> Path:
        rc = self.rc
        bar = tqdm(range(self.iteration, rc.iterations), initial=self.iteration, total=rc.iterations,
                   disable=not rc.progress or self.rank != 0, desc=f"{self.cfg.algo}")
        success = None  # the last unbiased training success rate, for the progress bar
        for it in bar:
            self.outcomes.begin(it, self.clock == 0)
            if getattr(self.algo, "off_policy", False):
                stats, roll = self.collect_off_policy()
            else:
                buf, roll = self.collect()
                t0 = time.perf_counter()
                stats = self.algo.update(buf)
                stats["update_time"] = time.perf_counter() - t0
            self.iteration = it + 1
            w, step = self.writer, self.env_steps
            # envs that diverged (info["unstable"]) this iteration, over all ranks
            unstable = self.divergence.end_iteration(reduce=_sum_int if self.world > 1 else None)
            w.add_scalar("train/unstable_envs", unstable, step)
            self._stop_if_diverged()
            for _it, success, n in self._completed_outcomes():  # unbiased: see vla_rl.train_monitor
                w.add_scalar("train/success_rate", success, step)
                w.add_scalar("train/success_rate_episodes", n, step)
            ended = (len(roll["success"]), sum(roll["success"]), sum(roll["return"]), sum(roll["length"]))
            if self.world > 1:
                ended, roll = self._global_rollout(ended, roll, stats)
            if ended[0]:
                # Success among the episodes that ended in this rollout: biased toward short (successful) ones.
                w.add_scalar("train/success_rate_ended", ended[1] / ended[0], step)
                w.add_scalar("train/episode_return", ended[2] / ended[0], step)
                w.add_scalar("train/episode_length", ended[3] / ended[0], step)
            w.add_scalar("perf/env_steps_per_s", roll["env_steps_per_s"], step)
            w.add_scalar("perf/update_time", stats["update_time"], step)
            w.add_scalar("perf/rollout_time", roll["rollout_time"], step)  # env + chain sampling (+ critic)
            self.last_env_steps_per_s = roll["env_steps_per_s"]
            for k, v in stats.items():
                if k != "update_time":
                    w.add_scalar(f"loss/{k}" if "loss" in k else f"train/{k}", v, step)
            if rc.eval_every and self.iteration % rc.eval_every == 0:
                ev = self._evaluate()
                w.add_scalar("eval/success_rate", ev["success_rate"], step)
                w.add_scalar("eval/episode_return", ev["mean_return"], step)
                w.add_scalar("eval/episodes", ev["num_episodes"], step)
                self.obs = self._reset(self.seed + self.iteration) if self.eval_env is self.env else self.obs
            if (rc.checkpoint_every and self.iteration % rc.checkpoint_every == 0) or self.iteration == rc.iterations:
                self.save(self.ckpt_dir)
            bar.set_postfix(success="..." if success is None else f"{success:.2f}", unstable=unstable)
        self.writer.flush()
        self.writer.close()
        return self.log_dir

    # ------------------------------------------------------------------ several ranks
    def _evaluate(self) -> dict:
        """Evaluation on ``eval_episodes`` episodes; with several ranks each runs its share on its own envs
        (seeded from its rank seed) and the counts are summed, so rank 0 logs the whole evaluation."""
        rc = self.rc
        if self.world == 1:
            return evaluate(self.policy, self.eval_env, rc.eval_episodes, seed=rc.seed + 10_000)
        share = distributed.split_count(rc.eval_episodes, self.world, self.rank)
        ev = evaluate(self.policy, self.eval_env, share, seed=self.seed + 10_000) if share else None
        n = ev["num_episodes"] if ev else 0
        k, ret, n = distributed.all_sum([ev["success_rate"] * n if ev else 0.0, ev["mean_return"] * n if ev else 0.0,
                                         float(n)])
        return {"success_rate": k / max(n, 1), "mean_return": ret / max(n, 1), "num_episodes": int(n)}

    def _completed_outcomes(self) -> list[tuple[int, float, int]]:
        """The unbiased training success rate of every iteration now known on *all* ranks (each rank finishes
        an iteration's quota of episodes at its own pace), summed over ranks."""
        if self.world == 1:
            return self.outcomes.completed()
        for counts in distributed.gather_objects(self.outcomes.completed_counts()):
            for it, k, n, spoiled in counts:
                entry = self._pending_outcomes.setdefault(it, [0, 0, False, 0])
                entry[0], entry[1], entry[2], entry[3] = entry[0] + k, entry[1] + n, entry[2] or spoiled, entry[3] + 1
        out = []
        for it in sorted(self._pending_outcomes):
            k, n, spoiled, reported = self._pending_outcomes[it]
            if reported < self.world:
                break
            del self._pending_outcomes[it]
            if not spoiled and n:
                out.append((it, k / n, n))
        return out

    def _global_rollout(self, ended: tuple, roll: dict, stats: dict) -> tuple[tuple, dict]:
        """The rollout's logged numbers over all ranks: ended episodes pooled (count, successes, return and
        length sums), env steps/s of the whole job (every rank's env steps over the slowest rank's rollout
        time), and the slowest rank's update time."""
        *ended, n_exec = distributed.all_sum([*ended, roll.get("n_exec", 0)])
        dt, up = distributed.all_max([roll["rollout_time"], stats["update_time"]])
        stats["update_time"] = up
        return (int(ended[0]), *ended[1:]), {**roll, "rollout_time": dt, "env_steps_per_s": n_exec / max(dt, 1e-9)}

    def _stop_if_diverged(self) -> None:
        """Stop (before this iteration's data is checkpointed) when most envs keep diverging."""
        try:
            self.divergence.check(self.iteration, f"The last checkpoint in {self.ckpt_dir} is kept.")
        except Exception:
            self.writer.flush()
            raise

    # ------------------------------------------------------------------ checkpoint
    def save(self, path: Path) -> Path:
        """Write the checkpoint atomically. With several ranks every rank calls this (each contributes its
        RNG streams), rank 0 alone writes, and all return once the checkpoint is in place."""
        ranks = None
        if self.world > 1:
            ranks = distributed.gather_objects({"torch_rng": torch.get_rng_state().tolist(),
                                                "gen_rng": self.gen.get_state().tolist()})
            if self.rank != 0:
                distributed.barrier()  # rank 0 writes
                return Path(path)
            out = self._write(path, ranks)
            distributed.barrier()
            return out
        return self._write(path, ranks)

    def _write(self, path: Path, ranks: list | None) -> Path:
        tensors, opt_meta = {}, {}
        for name, opt in self.algo.optimizers().items():
            sd = opt.state_dict()
            scalars = {}
            for pid, st in sd["state"].items():
                for k, v in st.items():
                    if isinstance(v, torch.Tensor):
                        tensors[f"{name}/{pid}/{k}"] = v.detach().cpu().contiguous()
                    else:
                        scalars[f"{pid}/{k}"] = v
            opt_meta[name] = {"param_groups": sd["param_groups"], "scalars": scalars}
        state = {"iteration": self.iteration, "env_steps": self.env_steps, "optimizers": opt_meta,
                 "algo": self.algo.extra_state(), "torch_rng": torch.get_rng_state().tolist(),
                 "gen_rng": self.gen.get_state().tolist(), "config": _jsonable(asdict(self.cfg))}
        if ranks is not None:  # several ranks: each one's RNG streams, for a resume on the same world size
            state["world_size"], state["ranks"] = self.world, ranks

        algo_tensors = self.algo.state_tensors() if hasattr(self.algo, "state_tensors") else {}

        def write(tmp: Path):
            self.policy.save_pretrained(tmp / "policy", extra={"iteration": self.iteration})
            save_file(tensors, str(tmp / "optim.safetensors"))
            if algo_tensors:  # critics, targets, replay buffer of an off-policy algorithm
                save_file({k: v.detach().cpu().contiguous() for k, v in algo_tensors.items()}, str(tmp / "algo.safetensors"))
            (tmp / "state.json").write_text(json.dumps(state))

        return write_dir_atomically(path, write, checksums=True)

    def load(self, path: Path, state: dict | None = None) -> None:
        """Restore the checkpoint at ``path`` (``state``: its already verified state.json)."""
        path = Path(path)
        state = state if state is not None else open_checkpoint(path)
        loaded = VLAPolicy.from_pretrained(path / "policy", device=self.policy.device)
        if (loaded.noise_actor is None) != (self.policy.noise_actor is None):
            raise ValueError(f"{path}: the checkpoint's policy and this run's algorithm ({self.cfg.algo}) disagree "
                             "on the DSRL noise actor; resume with the algorithm that wrote it")
        if loaded.cfg.critic_clock != self.policy.cfg.critic_clock:
            fix = (f"rwr.weights={'advantage' if loaded.cfg.critic_clock else 'return'}" if self.cfg.algo == "rwr"
                   else f"dppo.critic_clock={str(loaded.cfg.critic_clock).lower()}")
            raise ValueError(f"{path}: the checkpoint's critic {'reads' if loaded.cfg.critic_clock else 'does not read'} the "
                             f"episode clock; resume with {fix}")
        try:
            self.policy.load_state_dict(loaded.state_dict())
        except RuntimeError as e:  # the networks of this run and the checkpoint differ in shape
            raise CheckpointError(f"{path / 'policy'} does not fit this run's policy: {e}") from e
        tensors = _read_tensors(path / "optim.safetensors")
        try:
            self._load_optimizers(state, tensors)
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path / 'optim.safetensors'} does not fit this run's optimizers: {e!r}") from e
        if hasattr(self.algo, "state_tensors"):
            self.algo.load_extra_state(state["algo"], _read_tensors(path / "algo.safetensors"))
        else:
            self.algo.load_extra_state(state["algo"])
        self.iteration, self.env_steps = state["iteration"], state["env_steps"]
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        self._gen_state = torch.tensor(state["gen_rng"], dtype=torch.uint8)

    def _load_optimizers(self, state: dict, tensors: dict) -> None:
        for name, opt in self.algo.optimizers().items():
            meta = state["optimizers"][name]
            st: dict[int, dict[str, Any]] = {}
            for key, v in tensors.items():
                o, pid, k = key.split("/", 2)
                if o == name:
                    st.setdefault(int(pid), {})[k] = v
            for key, v in meta["scalars"].items():
                pid, k = key.split("/", 1)
                st.setdefault(int(pid), {})[k] = v
            opt.load_state_dict({"state": st, "param_groups": meta["param_groups"]})


def check_distributed(cfg: TrainConfig, world: int) -> None:
    """What a run on ``world`` ranks needs of its config; each problem is a ConfigError naming the key."""
    rc = cfg.runner
    if rc.num_envs % world:
        raise ConfigError(f"runner.num_envs={rc.num_envs} must be divisible by the number of processes ({world}): "
                          f"each rank steps runner.num_envs / {world} envs")
    if cfg.algo == "dsrl" and cfg.dsrl.batch_size % world:
        raise ConfigError(f"dsrl.batch_size={cfg.dsrl.batch_size} must be divisible by the number of processes ({world}): "
                          f"it is the global batch of a gradient step, each rank samples batch_size / {world} of it")
    local = rc.num_envs // world
    if rc.group_size > 0 and local % rc.group_size:
        raise ConfigError(f"runner.group_size={rc.group_size} must divide each rank's {local} envs "
                          f"(runner.num_envs={rc.num_envs} over {world} ranks): a group of identical starts lives on one rank")
    if cfg.algo == "dppo" and cfg.dppo.advantage == "group" and rc.group_size == 0:
        raise ConfigError("dppo.advantage=group with runner.group_size=0 (a per-instruction baseline) needs every "
                          f"rank's episodes of an instruction in one place; on {world} ranks set runner.group_size > 0 "
                          "(groups of identical starts, one rank each)")


def _rank_env_cfg(env_cfg: dict, rank: int) -> dict:
    """The env section a rank builds its envs from: a set env seed is offset per rank (the runner's resets pass
    rank seeds anyway; this covers what an env draws before its first reset, e.g. worker processes)."""
    env_cfg = dict(env_cfg)
    if env_cfg.get("seed") is not None:
        env_cfg["seed"] = distributed.rank_seed(int(env_cfg["seed"]), rank)
    return env_cfg


def _cpu(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu(v) for v in x)
    return x


def _sum_int(x: int) -> int:
    return int(distributed.all_sum([x])[0])


class _NoWriter:
    """Ranks other than 0 log nothing: TensorBoard is written by rank 0 alone."""

    def add_scalar(self, *_args, **_kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _read_tensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated / garbage files
        raise CheckpointError(f"{path} is missing or corrupt: {e}") from e


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x if isinstance(x, (int, float, str, bool, type(None))) else str(x)


def train(cfg: TrainConfig, policy=None, env=None, eval_env=None) -> Path:
    """Run (or resume) an RL stage; returns the run directory (TensorBoard under ``tb/``, ``checkpoint/``)."""
    return Runner(cfg, policy=policy, env=env, eval_env=eval_env).train()
