"""Behaviour-cloning pretraining of the VLA policy with the diffusion / flow-matching loss.

``vla-rl pretrain --data DIR --config configs/pretrain/place.yaml`` or ``pretrain(PretrainConfig(...))``.
Observation and action sizes come from the data; normalization is fitted on it. The weights saved are
the EMA weights (the usual choice for diffusion policies); the checkpoint is a directory loadable
with ``VLAPolicy.from_pretrained``, rewritten atomically at every save.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from . import distributed
from .config import ConfigError, check_values
from .data import DemoDataset, load_episodes
from .policy import DIT_SIZES, PolicyConfig, VLAPolicy


@dataclass
class PretrainConfig:
    data: str = ""  # a demo directory or .hdf5 file (see vla_rl.data)
    out: str = "runs/pretrain"  # the checkpoint directory written
    size: str = ""  # optional action-head preset: tiny | small | base | large (overrides policy.dit)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    only_success: bool = True  # train on successful demos only
    steps: int = 2000
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 1e-6
    warmup_steps: int = 100
    # After the linear warm-up: "constant" lr, or "cosine" decay to 0 at `steps` (as Diffusion Policy
    # trains). On `place` with 150 demos the cosine decay fit the demos closer and generalized worse:
    # 0.27 / 0.23 success on two 128-episode sets against 0.50 for constant (BENCHMARKS.md).
    lr_schedule: str = "constant"
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    log_every: int = 50
    save_every: int = 1000
    log_dir: str = ""  # TensorBoard directory (default: <out>/tb)
    progress: bool = True


def build_policy_for_data(cfg: PretrainConfig, dataset: DemoDataset) -> VLAPolicy:
    pcfg = copy.deepcopy(cfg.policy)
    ep = dataset.episodes[0]
    pcfg.action_dim = int(ep["action"].shape[1])
    pcfg.state_dim = int(ep["state"].shape[1])
    pcfg.privileged_dim = int(ep["privileged"].shape[1]) if "privileged" in ep else 0
    if pcfg.cameras:
        if "rgb" not in ep:
            raise ValueError(f"policy.cameras={pcfg.cameras} but the demos in {cfg.data} have no images")
        cams, _, h, w = ep["rgb"].shape[1:]
        if cams != len(pcfg.cameras):
            raise ValueError(f"demos have {cams} cameras but policy.cameras lists {len(pcfg.cameras)}")
        pcfg.image_size = [int(h), int(w)]
    if cfg.size:
        if cfg.size not in DIT_SIZES:
            raise ValueError(f"unknown size {cfg.size!r}; choose one of {sorted(DIT_SIZES)}")
        pcfg.dit = copy.deepcopy(DIT_SIZES[cfg.size])
    policy = VLAPolicy(pcfg)
    policy.normalizer.fit(dataset.all_actions(), dataset.all_states())
    return policy


def pretrain(cfg: PretrainConfig) -> Path:
    """Run behaviour cloning; returns the checkpoint directory."""
    check_values(cfg)  # steps=0 would "finish" having written nothing
    if not cfg.data:
        raise ValueError("pretrain needs data= (a demo directory or .hdf5 file)")
    schedule = lr_factor(cfg)  # a bad schedule name fails before any data is read
    ctx = distributed.setup(cfg.device)  # several ranks under torchrun; nothing for one process
    world, main = ctx.world_size, ctx.is_main
    device = ctx.device(cfg.device)
    if world > 1 and cfg.batch_size % world:
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({world}): "
                          f"it is the global batch, each rank takes batch_size / {world} of it")
    torch.manual_seed(cfg.seed)
    episodes = load_episodes(cfg.data, only_success=cfg.only_success)
    dataset = DemoDataset(episodes, horizon=cfg.policy.horizon, use_rgb=bool(cfg.policy.cameras))
    policy = build_policy_for_data(cfg, dataset).to(device)
    distributed.broadcast_module(policy)  # every rank starts from rank 0's weights (as DDP does)
    if world > 1:  # the denoising loss's noise and timesteps: a stream per rank, not the same draws on each
        torch.manual_seed(distributed.rank_seed(cfg.seed, ctx.rank))
    ema = copy.deepcopy(policy).eval()
    for p in ema.parameters():
        p.requires_grad_(False)

    data = dataset.tensors()
    n, batch_size = len(dataset), min(cfg.batch_size, len(dataset))
    gen = torch.Generator().manual_seed(cfg.seed)
    params = policy.actor_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    out = Path(cfg.out)
    writer = SummaryWriter(cfg.log_dir or str(out.parent / f"{out.name}_tb")) if main else None
    bar = tqdm(total=cfg.steps, desc="pretrain", disable=not cfg.progress or not main, dynamic_ncols=True)
    step, t0, epoch = 0, time.time(), 0
    meta = {"stage": "pretrain", "data": str(cfg.data), "episodes": len(episodes)}
    while step < cfg.steps:
        if world > 1:
            # Each rank takes its own 1/world of every epoch's shuffled demos (torch's DistributedSampler: one
            # permutation from seed + epoch on every rank, split by rank) and batches of batch_size / world, so
            # a step's global batch is batch_size distinct demo windows, as in one process.
            if n < world:
                raise ValueError(f"{cfg.data}: {n} demo windows cannot be split over {world} processes")
            perm, local = _rank_indices(n, world, ctx.rank, cfg.seed, epoch), max(1, batch_size // world)
        else:
            perm, local = torch.randperm(n, generator=gen), batch_size
        epoch += 1
        for start in range(0, len(perm) - local + 1, local):  # epochs of shuffled batches, last partial dropped
            idx = perm[start:start + local]
            batch = {k: ([v[i] for i in idx.tolist()] if k == "instruction" else v[idx]) for k, v in data.items()}
            obs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()
                   if k in ("state", "rgb", "privileged", "instruction")}
            loss = policy.bc_loss(obs, batch["action"].to(device), batch["action_mask"].to(device))
            if world > 1:  # the global batch's loss: every rank stops together on a non-finite one
                loss_value = distributed.all_mean([loss.item()])[0]
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"pretrain loss became {loss_value} at step {step} (mean over {world} ranks); "
                                             f"last good checkpoint: {out}")
            elif not torch.isfinite(loss):
                raise FloatingPointError(f"pretrain loss became {loss.item()} at step {step}; last good checkpoint: {out}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(params)  # ranks: the global batch's gradient (see vla_rl.distributed)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            _ema_update(ema, policy, min(cfg.ema_decay, (1 + step) / (10 + step)))
            step += 1
            bar.update(1)
            if main and (step % cfg.log_every == 0 or step == cfg.steps):
                writer.add_scalar("pretrain/bc_loss", loss_value if world > 1 else loss.item(), step)
                writer.add_scalar("pretrain/grad_norm", float(grad_norm), step)
                writer.add_scalar("pretrain/lr", sched.get_last_lr()[0], step)
                writer.add_scalar("pretrain/samples_per_s", step * batch_size / (time.time() - t0), step)
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if main and (step % cfg.save_every == 0 or step == cfg.steps):
                ema.save_pretrained(out, extra={**meta, "step": step})
            if step >= cfg.steps:
                break
    bar.close()
    if writer is not None:
        writer.close()
    distributed.barrier()  # every rank returns once rank 0 has written the checkpoint
    return out


def _rank_indices(n: int, world: int, rank: int, seed: int, epoch: int) -> torch.Tensor:
    """This rank's demo indices for one epoch: torch's DistributedSampler over the demo windows."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def lr_factor(cfg: PretrainConfig):
    """Multiplier of cfg.lr at each optimizer step (for LambdaLR)."""
    if cfg.lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {cfg.lr_schedule!r}")
    warm = max(1, cfg.warmup_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, cfg.steps - warm))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, m in zip(ema.parameters(), model.parameters()):
        e.lerp_(m, 1 - decay)
    for e, m in zip(ema.buffers(), model.buffers()):
        e.copy_(m)
