"""Env steps/s of the full DPPO loop (collect + update, all ranks) on `place` with 1 and 2 ranks, side by side
in one script run: configurations interleaved round by round (so machine load hits them alike), each run a
fresh job started by ``vla_rl.distributed.spawn`` (the Python-API twin of ``torchrun --standalone``), medians
over rounds. Not a test.

    python benchmarks/bench_distributed.py --rounds 3 --iters 2

A run: one warm-up iteration, then ``--iters`` timed iterations between two barriers (so the time is the
slowest rank's); checkpoint writes are switched off (disk, not compute). The global batch is the same in
every configuration (``--num-envs`` envs x ``--decisions`` decisions x 4 executed actions), so the rows
compare wall-clock for the same work; the 2-rank job steps ``num-envs / 2`` envs per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = {  # name: (ranks, torch threads per rank)
    "1 rank, 1 thread": (1, 1),
    "1 rank, 2 threads": (1, 2),
    "2 ranks, 1 thread each": (2, 1),
}


def _rank(opts: dict, out: str) -> None:
    from vla_rl import distributed
    from vla_rl.algos import DPPOConfig
    from vla_rl.envs import make_env
    from vla_rl.policy import PolicyConfig, VLAPolicy
    from vla_rl.runner import Runner, RunnerConfig, TrainConfig

    ctx = distributed.setup(opts["device"])
    device = ctx.device(opts["device"])  # cuda -> cuda:<local rank>
    torch.set_num_threads(opts["threads"])
    probe = make_env("place", 1)
    spec = probe.spec
    probe.close()
    cfg = PolicyConfig(action_dim=spec.action_dim, state_dim=spec.state_dim, privileged_dim=spec.privileged_dim,
                       horizon=8, exec_steps=4, language_encoder="hash")
    cfg.noise.stochastic_steps = 5
    torch.manual_seed(0)
    policy = VLAPolicy(cfg).to(device)
    tc = TrainConfig(algo="dppo", env={"task": "place"}, dppo=DPPOConfig(target_kl=0.0, kl_revert=0.0),
                     runner=RunnerConfig(iterations=1, num_envs=opts["num_envs"], steps_per_iter=opts["decisions"],
                                         eval_every=0, checkpoint_every=0, resume=False, progress=False,
                                         log_dir=opts["log_dir"], device=opts["device"]))
    runner = Runner(tc, policy=policy)
    runner.save = lambda path: path  # no checkpoint writes: the benchmark measures compute and communication
    runner.train()  # warm-up iteration
    distributed.barrier()
    t0, cpu0 = time.perf_counter(), time.process_time()
    comm0 = dict(distributed.COLLECTIVE_STATS)
    runner.rc.iterations = 1 + opts["iters"]
    runner.train()
    distributed.barrier()
    dt = time.perf_counter() - t0
    # The CPU this rank got over the timed window (1.0 = a whole core): below 1 it waited for a core (a busy
    # machine) or for the other rank in a collective (gloo waits without spinning).
    cpu_share = distributed.gather_objects((time.process_time() - cpu0) / dt)
    comm = {k: distributed.COLLECTIVE_STATS[k] - comm0[k] for k in comm0}
    if ctx.rank == 0:
        steps = opts["iters"] * opts["decisions"] * opts["num_envs"] * cfg.exec_steps
        Path(out).write_text(json.dumps({"seconds": dt, "env_steps": steps, "env_steps_per_s": steps / dt,
                                         "rollout_env_steps_per_s": runner.last_env_steps_per_s,
                                         "collective_s_per_iter": comm["seconds"] / opts["iters"],
                                         "collectives_per_iter": comm["calls"] / opts["iters"],
                                         "cpu_share_per_rank": cpu_share, "load_avg_1min": os.getloadavg()[0],
                                         "envs_per_rank": runner.env.num_envs}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=2, help="timed iterations per run (after 1 warm-up)")
    p.add_argument("--num-envs", type=int, default=32, help="global: split over the ranks")
    p.add_argument("--decisions", type=int, default=10)
    p.add_argument("--configs", nargs="+", default=["1 rank, 1 thread", "2 ranks, 1 thread each"], choices=list(CONFIGS))
    p.add_argument("--device", default="cpu", help="cpu (gloo), or cuda: one GPU per rank (NCCL)")
    p.add_argument("--json", help="write every run's numbers here")
    a = p.parse_args()

    from vla_rl import distributed

    runs: dict[str, list[dict]] = {c: [] for c in a.configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name in a.configs:
                ranks, threads = CONFIGS[name]
                out = os.path.join(tmp, f"{r}-{ranks}-{threads}.json")
                opts = {"threads": threads, "device": a.device, "num_envs": a.num_envs, "decisions": a.decisions, "iters": a.iters,
                        "log_dir": os.path.join(tmp, f"run-{r}-{ranks}-{threads}")}
                distributed.spawn(_rank, ranks, opts, out)
                res = json.loads(Path(out).read_text())
                runs[name].append(res)
                print(f"round {r + 1}: {name}: {res['env_steps_per_s']:.0f} env steps/s "
                      f"({res['env_steps']} steps in {res['seconds']:.2f} s; rollout alone "
                      f"{res['rollout_env_steps_per_s']:.0f}/s; rank 0 in collectives {res['collective_s_per_iter']:.2f} s "
                      f"per iteration over {res['collectives_per_iter']:.0f} calls; CPU per rank "
                      f"{', '.join(f'{c:.2f}' for c in res['cpu_share_per_rank'])}; load average {res['load_avg_1min']:.1f})",
                      flush=True)
    base = statistics.median(x["env_steps_per_s"] for x in runs[a.configs[0]])
    print(f"\n{a.num_envs} envs (global) x {a.decisions} decisions x 4 actions per iteration, {a.iters} timed "
          f"iterations per run, medians of {a.rounds} runs:")
    print("| configuration | envs per rank | env steps/s (full loop) | rollout env steps/s | s/iter in collectives "
          "(rank 0) | CPU per rank (cores) | vs first row |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in runs.items():
        med = statistics.median(x["env_steps_per_s"] for x in rs)
        roll = statistics.median(x["rollout_env_steps_per_s"] for x in rs)
        comm = statistics.median(x["collective_s_per_iter"] for x in rs)
        each = ", ".join(f"{x['env_steps_per_s']:.0f}" for x in rs)
        cpu = statistics.median(c for x in rs for c in x["cpu_share_per_rank"])
        print(f"| {name} | {rs[0]['envs_per_rank']} | {med:.0f} (runs: {each}) | {roll:.0f} | {comm:.2f} | {cpu:.2f} | "
              f"{med / base:.2f}x |")
    loads = [x["load_avg_1min"] for rs in runs.values() for x in rs]
    print(f"1-minute load average during the runs: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores")
    if a.json:
        Path(a.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
