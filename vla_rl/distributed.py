"""Data-parallel training on torch.distributed: one process per rank, launched by ``torchrun`` (or
:func:`spawn` on one machine), gloo on CPU and NCCL on GPU.

What a rank does (``vla_rl.runner`` and ``vla_rl.pretrain`` call the helpers below):

* it owns ``runner.num_envs / world_size`` envs (and their worker processes), seeded from
  :func:`rank_seed` ``(runner.seed, rank)`` -- rank 0 uses the global seed itself, so a 1-rank run is the
  single-process run;
* it collects its share of every rollout and computes the loss on its own rows; the gradients of every
  trained parameter are averaged over ranks (:func:`average_gradients`) before clipping and the optimizer
  step, so every rank applies the same step to the same weights;
* every statistic that shapes the update (advantage normalization, the running reward scale, RWR's return
  normalization and episode count, the approx KL that stops or reverts an update, DSRL's decision count)
  and every logged number is reduced over all ranks, so N ranks compute the update one process would
  compute on the concatenated batch;
* rank 0 alone writes TensorBoard and checkpoints; the others receive its weights and optimizer state at
  start (:func:`broadcast_module`, :func:`broadcast_object`), so they never read the checkpoint directory
  (no shared filesystem needed to resume).

Nothing here initializes torch.distributed for a 1-process run: :func:`setup` does so only when
``WORLD_SIZE > 1`` (set by torchrun), and every helper returns its input unchanged when the world is one
process, so the single-process path runs exactly the code it ran before.

Failure: collectives time out after ``VLA_RL_DIST_TIMEOUT`` seconds (default 600), so a rank that hangs
ends the job instead of blocking it forever; a rank that raises exits, its peers' pending collectives fail
(gloo: "connection closed by peer"; NCCL: the watchdog aborts), and torchrun stops the job and prints the
failed rank's exception (``vla-rl`` writes it to torchrun's error file). With ``torchrun --max-restarts K``
the elastic agent restarts *all* ranks, which resume from the last checkpoint (runner.resume=true).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

TIMEOUT_ENV = "VLA_RL_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """The device this rank uses for a configured device: ``cuda`` becomes ``cuda:<local rank>`` (one GPU
        per process), an explicit index or the CPU is kept."""
        d = torch.device(device)
        if d.type == "cuda" and d.index is None and self.world_size > 1:
            return f"cuda:{self.local_rank}"
        return device


def enabled() -> bool:
    """True when this process is one of several ranks of an initialized process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if enabled() else 1


def rank() -> int:
    return dist.get_rank() if enabled() else 0


def context() -> Context:
    if not enabled():
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError as e:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from e
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be > 0 seconds")
    return value


def setup(device: str = "cpu") -> Context:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``) if it is
    not joined yet; a no-op for one process. Backend: NCCL for a CUDA device, gloo otherwise."""
    if enabled():
        return context()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or not dist.is_available():
        return Context()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)  # before NCCL: one GPU per process, object collectives use it
    backend, timeout = ("nccl" if cuda else "gloo"), datetime.timedelta(seconds=timeout_s())
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or "0"
    if restart != "0":
        # A restart by torchrun (--max-restarts): the elastic agent's store still holds the previous attempt's
        # peer addresses under the same keys, and the new ranks would connect to dead ones ("Connection refused",
        # pytorch/pytorch#167288); this attempt's keys get their own prefix.
        store, rank_, world_ = next(dist.rendezvous("env://", timeout=timeout))
        store = dist.PrefixStore(f"vla_rl/attempt{restart}/", store)
        dist.init_process_group(backend=backend, store=store, rank=rank_, world_size=world_, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout)
    return context()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank_: int) -> int:
    """The seed of rank ``rank_`` derived from the global ``seed``: rank 0 keeps ``seed`` (a 1-rank run is the
    single-process run); the others are offset far apart, so the per-iteration seeds the runner derives from
    them (``seed + iteration``, ``seed + 10_000`` ...) never meet another rank's."""
    return int(seed) + int(rank_) * 1_000_000_007


def split_count(total: int, world: int, rank_: int) -> int:
    """Rank ``rank_``'s share of ``total`` items split over ``world`` ranks (the first ranks take the remainder)."""
    return total // world + (1 if rank_ < total % world else 0)


class CollectiveError(RuntimeError):
    """A collective failed on this rank: another rank stopped (its own error is the cause) or hangs."""


# Seconds spent in collectives and their count (communication plus waiting for the slowest rank), for
# benchmarks/bench_distributed.py's account of what limits scaling.
COLLECTIVE_STATS = {"seconds": 0.0, "calls": 0}


@contextlib.contextmanager
def _collective(what: str):
    """Name the situation when a collective fails: the backend's message (gloo: "Timed out waiting 600000ms
    for recv", "Connection closed by peer") says nothing about which rank or why."""
    t0 = time.perf_counter()
    try:
        yield
        COLLECTIVE_STATS["seconds"] += time.perf_counter() - t0
        COLLECTIVE_STATS["calls"] += 1
    except RuntimeError as e:
        if isinstance(e, CollectiveError):
            raise
        raise CollectiveError(
            f"rank {dist.get_rank()}/{dist.get_world_size()}: {what} did not complete: another rank stopped (its "
            f"error is the root cause torchrun reports) or did not reach it within {TIMEOUT_ENV}={timeout_s():g} s "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from e


# ---------------------------------------------------------------------------------------------- reductions
def _device_of(tensors) -> torch.device:
    for t in tensors:
        return t.device
    return torch.device("cpu")


def _comm_device(device: torch.device) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo reduces CPU tensors (and CUDA ones through a copy)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if device.type != "cpu" else device


def average_gradients(params) -> None:
    """Average the gradients of ``params`` over all ranks, in place (a no-op for one process).

    Why an explicit all-reduce rather than wrapping the policy in ``DistributedDataParallel``: DDP hooks
    gradient reduction into ``module.forward``, while the algorithms call several other methods of the
    policy in one loss (``log_prob``, ``value``, ``bc_loss``, DSRL's critics), freeze different parts
    depending on the config, and revert updates (dppo.kl_revert); DDP would need a forward() wrapper per
    loss and ``find_unused_parameters``. One flat all-reduce per optimizer step after ``backward()`` is the
    same arithmetic as DDP's bucketed averaging (sum / world) without those constraints; what it gives up
    is DDP's overlap of communication with the backward pass, which matters little for action heads of a
    few million parameters. A parameter whose gradient is ``None`` on some rank counts as a zero there (as
    DDP's ``find_unused_parameters``) and stays ``None`` only when it is ``None`` on every rank, so the
    optimizers see the same gradients everywhere."""
    if not enabled():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    world = dist.get_world_size()
    dev = _comm_device(params[0].device)
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float().to(dev)
                      for p in params] + [has])
    with _collective("the gradient all-reduce"):
        dist.all_reduce(flat)
    offset = 0
    counts = flat[-len(params):]
    for i, p in enumerate(params):
        n = p.numel()
        if counts[i] > 0:
            g = (flat[offset:offset + n] / world).view_as(p).to(device=p.device, dtype=p.dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)
        offset += n


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    dev = _comm_device(t.device)
    x = t.detach().to(dev).clone()
    with _collective("an all-reduce of statistics"):
        dist.all_reduce(x, op=op if op is not None else dist.ReduceOp.SUM)
    return x.to(t.device)


def all_sum(values):
    """Element-wise sum over ranks of a list of floats (returned unchanged for one process)."""
    if not enabled():
        return values
    return _all_reduce(torch.tensor(values, dtype=torch.float64)).tolist()


def all_max(values):
    if not enabled():
        return values
    return _all_reduce(torch.tensor(values, dtype=torch.float64), dist.ReduceOp.MAX).tolist()


def all_mean(values):
    """Element-wise mean over ranks of a list of floats: the global mean when every rank averaged the same
    number of rows (e.g. DPPO's equal minibatches)."""
    if not enabled():
        return values
    return [v / dist.get_world_size() for v in all_sum(values)]


def mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x.mean(), x.std())`` of the concatenation of every rank's ``x`` (unbiased std, as torch), two-pass
    for accuracy; for one process exactly ``x.mean(), x.std()``."""
    if not enabled():
        return x.mean(), x.std()
    s = _all_reduce(torch.stack([x.detach().double().sum(), torch.tensor(float(x.numel()), dtype=torch.float64,
                                                                          device=x.device)]))
    mean = s[0] / s[1]
    ss = _all_reduce((x.detach().double() - mean).pow(2).sum())
    std = (ss / (s[1] - 1)).sqrt() if s[1] > 1 else torch.tensor(float("nan"), dtype=torch.float64)
    return mean.to(x.dtype), std.to(x.dtype)


def moments(x: torch.Tensor) -> tuple[float, float, int]:
    """``(mean, population variance, count)`` of the concatenation of every rank's ``x``."""
    if not enabled():
        return x.mean().item(), x.var(unbiased=False).item(), x.numel()
    s = all_sum([x.double().sum().item(), float(x.numel())])
    mean = s[0] / s[1]
    ss = all_sum([(x.double() - mean).pow(2).sum().item()])[0]
    return mean, ss / s[1], int(s[1])


def explained_variance(y: torch.Tensor, pred: torch.Tensor) -> float:
    """``1 - Var(y - pred) / Var(y)`` over every rank's rows (nan when Var(y) = 0)."""
    if not enabled():
        var_y = y.var()
        return float("nan") if var_y == 0 else (1 - (y - pred).var() / var_y).item()
    _, std_y = mean_std(y)
    var_y = std_y ** 2
    if not torch.isfinite(var_y) or var_y == 0:
        return float("nan")
    _, std_r = mean_std(y - pred)
    return (1 - std_r ** 2 / var_y).item()


# ---------------------------------------------------------------------------------------------- objects
def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable, small), in rank order, on every rank; ``[obj]`` for one process."""
    if not enabled():
        return [obj]
    out = [None] * dist.get_world_size()
    with _collective("a gather of per-rank results"):
        dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (pickled between this job's own processes only)."""
    if not enabled():
        return obj
    box = [obj if dist.get_rank() == src else None]
    with _collective(f"a broadcast from rank {src}"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (what DDP does at construction)."""
    if not enabled():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dev = _comm_device(t.device)
        x = t.detach().to(dev).contiguous()
        with _collective(f"the broadcast of rank {src}'s weights"):
            dist.broadcast(x, src=src)
        if x.data_ptr() != t.data_ptr():
            t.copy_(x.to(t.device))


@torch.no_grad()
def broadcast_tensor(t: torch.Tensor, src: int = 0) -> None:
    """Copy rank ``src``'s tensor ``t`` into every rank's, in place."""
    if not enabled():
        return
    x = t.detach().to(_comm_device(t.device)).contiguous().clone()
    with _collective(f"a broadcast from rank {src}"):
        dist.broadcast(x, src=src)
    t.copy_(x.to(t.device))


def on_main(fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only and return its result on every rank. An exception on rank 0 is raised on
    every rank with the same type and message (so the ranks stop together with the same named error instead
    of waiting for rank 0 in their next collective)."""
    if not enabled():
        return fn(*args, **kwargs)
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 -- re-raised below on every rank
            error = e
    payload = broadcast_object(("err", type(error), str(error)) if error is not None else ("ok", result))
    if payload[0] == "err":
        if error is not None:
            raise error
        raise _rebuild(payload[1], payload[2])
    return payload[1]


def _rebuild(kind: type, message: str) -> Exception:
    try:
        return kind(message)
    except Exception:  # noqa: BLE001 -- an exception type that takes other arguments
        return RuntimeError(f"{kind.__name__} on rank 0: {message}")


def barrier() -> None:
    if enabled():
        with _collective("a barrier"):
            dist.barrier()


# ---------------------------------------------------------------------------------------------- launching
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(local_rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        fn(*args)
    finally:
        shutdown()


def spawn(fn, nprocs: int, *args) -> None:
    """Run ``fn(*args)`` in ``nprocs`` new processes on this machine, each a rank of one process group (the
    Python-API counterpart of ``torchrun --standalone --nproc-per-node nprocs``); ``fn`` calls
    :func:`setup` (``vla_rl.runner.train`` and ``vla_rl.pretrain.pretrain`` do). ``fn`` must be importable
    (defined at module level). If any rank raises, the others are terminated and a
    ``torch.multiprocessing.ProcessRaisedException`` carrying that rank's traceback is raised here."""
    import torch.multiprocessing as mp

    mp.spawn(_spawned, args=(nprocs, free_port(), fn, args), nprocs=nprocs, join=True)
