"""Multi-process CPU vectorization: ``num_envs`` copies of a task split into shards, one worker process
per shard, stepped in parallel.

The CPU MuJoCo backend steps its envs one after another on one core (physics-bound, see BENCHMARKS.md);
on a machine with more cores, ``make_env(..., workers=W)`` runs W shards of ``num_envs / W`` envs each
in their own processes and this class presents them as one :class:`~vla_rl.envs.base.BatchedEnv`-like
batch (same ``reset`` / ``step`` / ``reset_group`` contract, auto-reset, ``info`` keys). Only the small
tensors of a step cross the process boundary (as numpy arrays through a pipe).

Seeding: shard ``i`` is seeded ``seed + SHARD_SEED_STRIDE * i``, so a sharded batch is reproducible
(shard 0 draws what an unsharded env with the same seed would for its first envs), but it is not the
same batch as an unsharded env of ``num_envs``.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback

import numpy as np
import torch

from .base import EnvError

SHARD_SEED_STRIDE = 1_000_003


def _to_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, dict):
        return {k: _to_numpy(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_to_numpy(v) for v in x)
    return x


def _to_torch(x, device):
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x).to(device)
    if isinstance(x, dict):
        return {k: _to_torch(v, device) for k, v in x.items()}
    return x


def _worker(conn, task, num_envs: int, kwargs: dict) -> None:
    torch.set_num_threads(1)  # one core per shard; the parent owns the policy's threads
    try:
        from . import make_env

        env = make_env(task, num_envs, **kwargs) if isinstance(task, str) else task(num_envs, **kwargs)
        conn.send(("ok", env.spec))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", (e, traceback.format_exc())))
        return
    while True:
        cmd, arg = conn.recv()
        if cmd == "close":
            env.close()
            conn.send(("ok", None))
            return
        try:
            if cmd == "step":
                out = env.step(torch.from_numpy(arg))
            elif cmd == "reset":
                out = env.reset(seed=arg)
            elif cmd == "reset_group":
                out = env.reset_group(arg[0], seed=arg[1])
            elif cmd == "render":
                out = env.render()
            else:
                raise EnvError(f"unknown worker command {cmd!r}")
            conn.send(("ok", _to_numpy(out)))
        except BaseException as e:  # noqa: BLE001
            conn.send(("error", (e, traceback.format_exc())))


def _concat(parts: list, what: str):
    """Concatenate per-shard values along the env dimension (tensors, lists, dicts of them)."""
    first = parts[0]
    if isinstance(first, np.ndarray):
        return np.concatenate(parts, 0)
    if isinstance(first, list):
        return [x for p in parts for x in p]
    if isinstance(first, dict):
        keys = set(first)
        if any(set(p) != keys for p in parts):
            raise EnvError(f"shards disagree on the keys of {what}: {[sorted(p) for p in parts]}")
        return {k: _concat([p[k] for p in parts], f"{what}[{k!r}]") for k in first}
    raise EnvError(f"cannot concatenate {what} of type {type(first).__name__} across shards")


def _worker_error(i: int, exc: BaseException, tb: str) -> BaseException:
    """The worker's exception, same type where it can be rebuilt from a message, naming the worker."""
    msg = f"{exc} [in env worker {i}; its traceback:\n{tb}]"
    try:
        return type(exc)(msg)
    except Exception:  # noqa: BLE001 - exception types with other constructors
        return EnvError(msg)


class SubprocEnv:
    """``num_envs`` envs in ``workers`` processes (see the module docstring). ``task``: an env spec
    (``make_env(task, n, **kwargs)`` in each worker) or a picklable builder ``task(n, seed=..., **kwargs)``;
    ``per_shard``: extra keyword arguments for each shard (e.g. its slice of per-env instructions)."""

    def __init__(self, task, num_envs: int, workers: int, device="cpu", seed: int | None = None,
                 per_shard: list[dict] | None = None, **kwargs):
        if workers < 2:
            raise EnvError(f"SubprocEnv needs workers >= 2, got {workers} (use make_env(workers=1) for one process)")
        if num_envs < workers:
            raise EnvError(f"num_envs={num_envs} is fewer than workers={workers}")
        self.num_envs, self.device = int(num_envs), torch.device(device)
        base, extra = divmod(self.num_envs, workers)
        self.shard_sizes = [base + (i < extra) for i in range(workers)]
        ctx = mp.get_context("spawn")  # fork is unsafe once torch threads or a GL context exist
        self._conns, self._procs = [], []
        for i, n in enumerate(self.shard_sizes):
            parent, child = ctx.Pipe()
            shard_kwargs = {**kwargs, **(per_shard[i] if per_shard else {}), "seed": self._shard_seed(seed, i)}
            if isinstance(task, str):
                shard_kwargs["backend"] = "cpu"
            p = ctx.Process(target=_worker, args=(child, task, n, shard_kwargs), daemon=True,
                            name=f"vla_rl-env-shard{i}")
            p.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(p)
        specs = self._gather()
        self.spec = specs[0]

    @staticmethod
    def _shard_seed(seed, i):
        return None if seed is None else int(seed) + SHARD_SEED_STRIDE * i

    # ------------------------------------------------------------------ plumbing
    def _gather(self) -> list:
        replies = []
        for i, c in enumerate(self._conns):  # every reply is read, so no stale one is left in a pipe
            try:
                replies.append(c.recv())
            except (EOFError, ConnectionError, OSError) as e:
                raise self._died(i) from e
        for i, (status, payload) in enumerate(replies):
            if status == "error":
                raise _worker_error(i, *payload)
        return [payload for _, payload in replies]

    def _died(self, i: int) -> EnvError:
        """A worker is gone: the batch cannot go on, so every worker is shut down."""
        err = EnvError(f"env worker {i} died (exit code {self._procs[i].exitcode}); the env is closed")
        self.close()
        return err

    def _call(self, cmd: str, args: list) -> list:
        if not self._conns:
            raise EnvError("the env is closed")
        for i, (c, a) in enumerate(zip(self._conns, args)):
            try:
                c.send((cmd, a))
            except (BrokenPipeError, ConnectionError, OSError) as e:
                raise self._died(i) from e
        return self._gather()

    def _obs(self, parts: list) -> dict:
        return _to_torch(_concat(parts, "obs"), self.device)

    # ------------------------------------------------------------------ BatchedEnv API
    def reset(self, seed: int | None = None) -> dict:
        return self._obs(self._call("reset", [self._shard_seed(seed, i) for i in range(len(self._conns))]))

    def reset_group(self, group_size: int, seed: int | None = None) -> dict:
        if any(n % group_size for n in self.shard_sizes):
            raise EnvError(f"group_size={group_size} must divide every shard's env count {self.shard_sizes}")
        return self._obs(self._call("reset_group", [(group_size, self._shard_seed(seed, i))
                                                    for i in range(len(self._conns))]))

    def step(self, action):
        action = torch.as_tensor(action, dtype=torch.float32)
        if action.dim() not in (2, 3) or action.shape[0] != self.num_envs or action.shape[-1] != self.spec.action_dim:
            raise EnvError(f"action must have shape [num_envs={self.num_envs}, {self.spec.action_dim}] or "
                           f"[num_envs={self.num_envs}, T, {self.spec.action_dim}], got {tuple(action.shape)}")
        chunks = torch.split(action.cpu(), self.shard_sizes, 0)
        results = self._call("step", [c.numpy() for c in chunks])
        obs, reward, term, trunc, info = zip(*results)
        # final_obs exists only in shards where an episode ended; elsewhere its rows are never read.
        if any("final_obs" in i for i in info):
            for o, i in zip(obs, info):
                i.setdefault("final_obs", o)
        reward, term, trunc = (_to_torch(np.concatenate(x), self.device) for x in (reward, term, trunc))
        return self._obs(list(obs)), reward, term, trunc, _to_torch(_concat(list(info), "info"), self.device)

    def render(self) -> torch.Tensor:
        return _to_torch(np.concatenate(self._call("render", [None] * len(self._conns))), self.device)

    def close(self) -> None:
        for c, p in zip(self._conns, self._procs):
            try:
                c.send(("close", None))
                c.recv()
            except (EOFError, ConnectionError, BrokenPipeError):
                pass
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
        self._conns, self._procs = [], []

    def __del__(self):
        if getattr(self, "_conns", None):
            self.close()
