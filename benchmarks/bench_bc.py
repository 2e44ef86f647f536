"""Behaviour-cloning quality on a built-in task: the library's diffusion VLA against a plain Gaussian MLP on
the same demos, with the instruction either parsed for the policy (an oracle one-hot of the object and
container words appended to the state) or read by the policy's own language encoder. Not a test.

    python benchmarks/bench_bc.py --demos runs/demos_150 --policy mlp --oracle         # the control
    python benchmarks/bench_bc.py --demos runs/demos_150 --policy mlp                  # control, learned language
    python benchmarks/bench_bc.py --demos runs/demos_150 --policy vla                  # the library's default
    python benchmarks/bench_bc.py --demos runs/demos_150 --policy vla --oracle
    python benchmarks/bench_bc.py --demos runs/demos_150 --policy vla --set policy.head=mlp steps=3000

``--set`` takes ``vla_rl.pretrain.PretrainConfig`` keys (dotted). Evaluation: the same held-out episodes
for every variant (``--eval-seed``), sampled and deterministic (DDIM eta = 0 / the Gaussian's mean), with
Wilson 95% intervals; the result is appended to ``<out>/results.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from vla_rl.data import load_episodes
from vla_rl.envs import make_env
from vla_rl.evaluate import evaluate, run_episodes
from vla_rl.policy import VLAPolicy
from vla_rl.policy.encoders import LanguageEncoder
from vla_rl.pretrain import PretrainConfig, pretrain

WORDS = ("cube", "cylinder", "bowl", "box")  # the object and container words of `place`


def onehot(instructions) -> torch.Tensor:
    return torch.tensor([[float(w in s.split()) for w in WORDS] for s in instructions])


class OracleObs:
    """Env wrapper: ``state`` gets the one-hot of the instruction's object and container appended."""

    def __init__(self, env):
        self.env = env

    def __getattr__(self, name):
        return getattr(self.env, name)

    def _obs(self, obs):
        return {**obs, "state": torch.cat([obs["state"], onehot(obs["instruction"]).to(obs["state"])], -1)}

    @property
    def spec(self):
        return dataclasses.replace(self.env.spec, state_dim=self.env.spec.state_dim + len(WORDS))

    def reset(self, **kw):
        return self._obs(self.env.reset(**kw))

    def reset_group(self, *args, **kw):
        return self._obs(self.env.reset_group(*args, **kw))

    def step(self, action):
        obs, r, term, trunc, info = self.env.step(action)
        if "final_obs" in info:
            info = {**info, "final_obs": self._obs(info["final_obs"])}
        return self._obs(obs), r, term, trunc, info


def place_oracle(num_envs: int, **options):
    """Env spec ``bench_bc:place_oracle`` (with benchmarks/ on sys.path, as when a benchmark script runs):
    `place` with the oracle parse of the instruction appended to ``state``, for RL runs from an oracle base."""
    return OracleObs(make_env("place", num_envs, **options))


def oracle_copy(src: str, dst: Path) -> Path:
    """A copy of the demo file whose ``state`` arrays carry the oracle one-hot."""
    src_file = Path(src) if str(src).endswith(".hdf5") else Path(src) / "demos.hdf5"
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")  # renamed when whole: runs beside it may read dst
    with h5py.File(src_file) as f, h5py.File(tmp, "w") as g:
        for k, v in f.attrs.items():
            g.attrs[k] = v
        g.attrs["state_dim"] = int(f.attrs["state_dim"]) + len(WORDS)
        for name in f:
            f.copy(name, g)
            s = f[name]["state"][:]
            del g[name]["state"]
            oh = onehot([f[name].attrs["instruction"]]).numpy().repeat(len(s), 0)
            g[name]["state"] = np.concatenate([s, oh], -1).astype(np.float32)
    os.replace(tmp, dst)
    return dst


class GaussianMLP(nn.Module):
    """The control: tanh MLP mean, fixed std, MSE behaviour cloning on single actions. Without the oracle it
    reads the instruction through the library's learned word-hash embedding (``language=True``)."""

    def __init__(self, state_dim, action_dim, mean, std, hidden=256, log_std=-1.5, language=False):
        super().__init__()
        self.language = LanguageEncoder("hash", 64) if language else None
        width = state_dim + (64 if language else 0)
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, action_dim))
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.log_std = log_std

    def forward(self, state, instructions=None):
        x = (state - self.mean) / self.std
        if self.language is not None:
            x = torch.cat([x, self.language(list(instructions))], -1)
        return torch.tanh(self.net(x))


def train_mlp(data: str, steps: int, seed: int, language: bool) -> GaussianMLP:
    eps = load_episodes(data, only_success=True)
    x = torch.cat([torch.as_tensor(e["state"]) for e in eps]).float()
    y = torch.cat([torch.as_tensor(e["action"]) for e in eps]).float().clamp(-1, 1)
    instr = [e["instruction"] for e in eps for _ in range(len(e["state"]))]
    model = GaussianMLP(x.shape[1], y.shape[1], x.mean(0), x.std(0).clamp(min=1e-3), language=language)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(x), (256,), generator=g)
        loss = (model(x[i], [instr[j] for j in i.tolist()]) - y[i]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def eval_mlp(model, env, n, seed, deterministic):
    g = torch.Generator().manual_seed(seed)

    def act(obs, _):
        m = model(obs["state"].float(), obs["instruction"])
        return m if deterministic else (m + np.exp(model.log_std) * torch.randn(m.shape, generator=g)).clamp(-1, 1)

    with torch.no_grad():
        return run_episodes(env, act, n, seed, 3, None, 10_000)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demos", required=True)
    p.add_argument("--policy", choices=["vla", "mlp"], default="vla")
    p.add_argument("--oracle", action="store_true", help="append the one-hot of the instruction's words to the state")
    p.add_argument("--set", nargs="*", default=[], help="PretrainConfig overrides, e.g. policy.head=mlp steps=3000")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default="place")
    p.add_argument("--eval-episodes", type=int, default=128)
    p.add_argument("--eval-seed", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="")
    p.add_argument("--out", default="runs/bench_bc")
    p.add_argument("--eval-only", action="store_true", help="evaluate the VLA already trained under --out/--name")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    out = Path(a.out)
    name = a.name or f"{a.policy}{'_oracle' if a.oracle else ''}_s{a.seed}"
    data = str(oracle_copy(a.demos, out / f"{Path(a.demos).name}_oracle.hdf5")) if a.oracle else a.demos
    t0 = time.time()
    if a.policy == "mlp":
        model = train_mlp(data, a.steps, a.seed, language=not a.oracle)
    elif a.eval_only:
        model = VLAPolicy.from_pretrained(out / name)
    else:
        cfg = OmegaConf.merge(OmegaConf.structured(PretrainConfig(data=data, out=str(out / name), steps=a.steps,
                                                                  size="tiny", lr=1e-3, seed=a.seed, progress=False)),
                              OmegaConf.from_dotlist(["policy.language_encoder=hash", *a.set]))
        pretrain(OmegaConf.to_object(cfg))
        model = VLAPolicy.from_pretrained(out / name)
    train_s = time.time() - t0
    res = {"name": name, "policy": a.policy, "oracle": a.oracle, "set": a.set, "steps": a.steps, "seed": a.seed,
           "demos": a.demos, "train_s": round(train_s, 1)}
    for det in (True, False):
        env = make_env(a.task, 32, seed=a.eval_seed)
        env = OracleObs(env) if a.oracle else env
        if a.policy == "mlp":
            ev = eval_mlp(model, env, a.eval_episodes, a.eval_seed, det)
        else:
            ev = evaluate(model, env, a.eval_episodes, deterministic=det, seed=a.eval_seed)
        env.close()
        key = "deterministic" if det else "sampled"
        res[key] = round(ev["success_rate"], 3)
        res[key + "_ci95"] = [round(c, 3) for c in ev["success_ci95"]]
    res["total_s"] = round(time.time() - t0, 1)
    print(json.dumps(res), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
