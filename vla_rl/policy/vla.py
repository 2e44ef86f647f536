"""The VLA policy: observation -> conditioning tokens -> diffusion/flow action head -> action chunk.

What the RL algorithms use (and nothing else):

* ``sample(obs) -> Chain``: the action chunk plus the latent before and after every stochastic
  denoising transition, and the log-likelihood the sampler drew each transition with;
* ``log_prob(obs, chain) -> [B, K']``: exact Gaussian log-likelihood of each stored transition
  under the current weights, all K' transitions in one batched forward pass;
* ``value(obs) -> [B]``: the critic (a separate network; it may see privileged state);
* ``bc_loss(obs, actions)``: the diffusion / flow-matching loss, for pretraining and regularization.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import CheckpointError, read_json, require_files, write_dir_atomically
from .config import HEAD_DTYPES, PolicyConfig
from .dit import DiTActionHead, MLPActionHead
from .encoders import ImageEncoder, LanguageEncoder, mlp
from .vlm_backbone import VLMBackbone, revision_hash
from .noise_actor import NoiseActor
from .noise import make_noise_process
from .normalizer import Normalizer

CONFIG_FILE, WEIGHTS_FILE, NORM_FILE, META_FILE = "config.yaml", "model.safetensors", "normalization.json", "meta.json"
FORMAT_VERSION = 1
VLM_DIR = "backbone"  # a copied VLM backbone inside a policy directory


class ObservationError(ValueError):
    """An observation does not match what the policy was built for."""


@dataclass
class Chain:
    """One sampled denoising chain per batch element.

    ``latents[:, j]`` is the (normalized) action chunk before stochastic transition j and
    ``latents[:, j + 1]`` after it; ``latents[:, -1]`` is the final sample. ``actions`` is that final
    sample clipped to [-1, 1] and mapped to env units.
    """

    actions: torch.Tensor  # [B, H, A] env units
    latents: torch.Tensor  # [B, K' + 1, H, A]
    log_prob: torch.Tensor  # [B, K'] at sampling time

    def __getitem__(self, idx) -> "Chain":
        return Chain(self.actions[idx], self.latents[idx], self.log_prob[idx])


class Critic(nn.Module):
    """Value of an observation: MLP over state (+ privileged state) + instruction (+ images)."""

    def __init__(self, cfg: PolicyConfig, language_dim: int):
        super().__init__()
        self.use_privileged = cfg.critic_privileged and cfg.privileged_dim > 0
        self.images = None
        self.use_clock = cfg.critic_clock
        width = cfg.state_dim + (cfg.privileged_dim if self.use_privileged else 0) + 32 + int(self.use_clock)
        if cfg.critic_images and cfg.cameras:
            self.images = ImageEncoder(len(cfg.cameras), cfg.image_channels, 1, 64)
            width += 64 * len(cfg.cameras)
        self.language = nn.Linear(language_dim, 32)
        self.net = mlp([width, *cfg.critic_hidden, 1])

    def forward(self, state, privileged, language, rgb=None, clock=None):
        parts = [state, self.language(language)]
        if self.use_privileged:
            parts.append(privileged)
        if self.use_clock:
            parts.append(clock.view(-1, 1))
        if self.images is not None:
            parts.append(self.images(rgb).flatten(1))
        return self.net(torch.cat(parts, -1)).squeeze(-1)


def bfloat16_head(head_dtype: str, device: torch.device) -> bool:
    """Whether ``policy.head_dtype`` runs the head in bfloat16 on ``device``; "auto": where the hardware has
    native bfloat16 (a CUDA GPU that supports it, a CPU with oneDNN's bfloat16 path: AVX512 or AMX)."""
    return head_dtype == "bfloat16" or (head_dtype == "auto" and _native_bfloat16(device.type))


@functools.lru_cache(maxsize=None)
def _native_bfloat16(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device_type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class VLAPolicy(nn.Module):
    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PolicyConfig), cfg))
        if cfg.exec_steps < 1 or cfg.exec_steps > cfg.horizon:
            raise ValueError(f"exec_steps must be in [1, horizon={cfg.horizon}], got {cfg.exec_steps}")
        self.language = LanguageEncoder(cfg.language_encoder, cfg.language_dim, cfg.language_buckets)
        cfg.language_encoder = self.language.kind  # "auto" resolved, so a checkpoint reloads the same way
        self.cfg = cfg
        d = cfg.dit.d_model
        self.normalizer = Normalizer(cfg.action_dim, cfg.state_dim)
        if cfg.backbone not in ("builtin", "transformers"):
            raise ValueError(f"policy.backbone must be 'builtin' or 'transformers', got {cfg.backbone!r}")
        if cfg.head_dtype not in HEAD_DTYPES:
            raise ValueError(f"policy.head_dtype must be one of {HEAD_DTYPES}, got {cfg.head_dtype!r}")
        self.vlm = None
        if cfg.backbone == "transformers":  # the VLM reads the cameras and the instruction (vlm_backbone.py)
            if not cfg.cameras:
                raise ValueError("policy.backbone=transformers runs a vision-language model over the camera images: "
                                 "policy.cameras is empty")
            self.vlm = VLMBackbone(cfg.vlm, len(cfg.cameras), d, cfg.dit.n_heads)
        self.images = (ImageEncoder(len(cfg.cameras), cfg.image_channels, cfg.image_tokens, d)
                       if cfg.cameras and self.vlm is None else None)
        self.language_proj = nn.Linear(self.language.out_dim, d) if self.vlm is None else None
        self.state_proj = mlp([cfg.state_dim, d, d])
        self.fusion = None
        if cfg.fusion_layers > 0:
            layer = nn.TransformerEncoderLayer(d, cfg.dit.n_heads, int(d * cfg.dit.mlp_ratio), cfg.dit.dropout,
                                               activation="gelu", batch_first=True, norm_first=True)
            self.fusion = nn.TransformerEncoder(layer, cfg.fusion_layers, enable_nested_tensor=False)
        self.head = self.make_head()
        self.early_head = self.make_head() if cfg.early_head else None
        if self.early_head is not None:
            self.early_head.requires_grad_(False)
        self.critic = Critic(cfg, self.language.out_dim)
        # The learned std per action dimension: the Gaussian control's only distribution parameter, and the
        # chain's stochastic transitions' std with noise.learn_std.
        self.action_log_std = (nn.Parameter(torch.full((cfg.action_dim,), float(cfg.noise.log_std_init)))
                               if cfg.noise.kind == "gaussian" or cfg.noise.learn_std else None)
        self.noise = make_noise_process(cfg.noise, self.action_log_std)
        self.noise_actor = self._make_noise_actor() if cfg.noise_actor.enabled else None
        if self.vlm is not None:
            self.print_parameter_counts()

    def print_parameter_counts(self) -> dict:
        """Print (and return) total and trainable parameter counts of the actor (VLM, projector, head)."""
        frozen = self.vlm.frozen_parameters() if self.vlm is not None else set()
        actor = [p for p in self.actor_parameters(include_frozen=True)]
        counts = {"total": sum(p.numel() for p in actor),
                  "trainable": sum(p.numel() for p in actor if id(p) not in frozen),
                  **(self.vlm.parameter_counts() if self.vlm is not None else {})}
        if self.vlm is not None:
            print(f"policy: {counts['total']:,} actor parameters, {counts['trainable']:,} trainable "
                  f"(VLM {self.vlm.model_type} from {self.vlm.directory}, mode {self.cfg.vlm.mode}: "
                  f"{counts['vlm_trainable']:,} of {counts['vlm_total']:,} VLM parameters trainable)", flush=True)
        return counts

    @property
    def num_cond_tokens(self) -> int:
        if self.vlm is not None:
            return 1 + self.cfg.vlm.tokens  # state, the VLM's pooled tokens
        return 2 + (len(self.cfg.cameras) * self.cfg.image_tokens if self.cfg.cameras else 0)  # state, language, cameras

    def _make_noise_actor(self) -> NoiseActor:
        return NoiseActor(self.cfg.noise_actor, self.num_cond_tokens * self.cfg.dit.d_model, self.cfg.horizon,
                          self.cfg.action_dim).to(self.device)

    def attach_noise_actor(self, **overrides) -> NoiseActor:
        """Give the policy a DSRL noise actor (``overrides`` patch ``NoiseActorConfig``) and freeze
        everything else: from now on ``sample`` steers the deterministic chain through x_K. A policy
        that already has one (a resumed or reloaded run) keeps it."""
        if self.cfg.noise.kind == "gaussian":
            raise ValueError("DSRL steers the initial noise of a diffusion/flow chain; a noise.kind='gaussian' "
                             "policy reads no noise")
        if self.noise_actor is None:
            for k, v in overrides.items():
                if not hasattr(self.cfg.noise_actor, k):
                    raise ValueError(f"unknown noise_actor option {k!r}")
                setattr(self.cfg.noise_actor, k, v)
            self.cfg.noise_actor.enabled = True
            self.noise_actor = self._make_noise_actor()
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith("noise_actor."))
        return self.noise_actor

    def make_head(self) -> nn.Module:
        cfg = self.cfg
        if cfg.head == "dit":
            return DiTActionHead(cfg.dit, cfg.action_dim, cfg.horizon)
        if cfg.head == "mlp":
            m = cfg.mlp_head
            return MLPActionHead(m.hidden, m.n_layers, self.num_cond_tokens, cfg.dit.d_model, cfg.action_dim, cfg.horizon, m.time_dim)
        raise ValueError(f"policy.head must be 'dit' or 'mlp', got {cfg.head!r}")

    @property
    def device(self) -> torch.device:
        return self.state_proj[0].weight.device

    # ------------------------------------------------------------------ observations
    def check_obs(self, obs: dict, for_critic: bool = False) -> int:
        """Validate an observation batch against the config; returns the batch size. Privileged state
        is checked only for the critic: the actor never sees it, so a deployed policy needs none."""
        if not isinstance(obs, dict):
            raise ObservationError(f"observation must be a dict, got {type(obs).__name__}")
        if "state" not in obs:
            raise ObservationError(f"observation lacks 'state' (has keys {sorted(obs)})")
        state = obs["state"]
        if state.dim() != 2 or state.shape[1] != self.cfg.state_dim:
            raise ObservationError(f"obs['state'] must be [B, {self.cfg.state_dim}], got {tuple(state.shape)}")
        b = state.shape[0]
        if not torch.isfinite(state).all():
            raise ObservationError("obs['state'] contains NaN/inf")
        if self.cfg.cameras:
            h, w = self.cfg.image_size
            want = (b, len(self.cfg.cameras), 3, h, w)
            rgb = obs.get("rgb")
            if rgb is None:
                raise ObservationError(f"policy uses cameras {self.cfg.cameras} but obs has no 'rgb'")
            if tuple(rgb.shape) != want:
                raise ObservationError(f"obs['rgb'] must be {list(want)} (uint8), got {list(rgb.shape)}")
        if for_critic and self.critic.use_privileged:
            p = obs.get("privileged")
            if p is None or tuple(p.shape) != (b, self.cfg.privileged_dim):
                got = None if p is None else tuple(p.shape)
                raise ObservationError(f"obs['privileged'] must be [B, {self.cfg.privileged_dim}], got {got}")
        instr = obs.get("instruction")
        if not isinstance(instr, (list, tuple)) or len(instr) != b or not all(isinstance(s, str) for s in instr):
            raise ObservationError(f"obs['instruction'] must be a list of {b} strings")
        return b

    def encode(self, obs: dict) -> torch.Tensor:
        """Conditioning tokens [B, N, d]: proprio, language, camera tokens."""
        self.check_obs(obs)
        device = self.device
        state = self.normalizer.normalize_state(obs["state"].to(device, torch.float32))
        if self.vlm is not None:  # one VLM pass per observation batch, reused by every denoising step
            return self.fuse([self.state_proj(state)[:, None], self.vlm(obs["rgb"].to(device), list(obs["instruction"]))])
        tokens = [self.state_proj(state)[:, None], self.language_proj(self.language(list(obs["instruction"])))[:, None]]
        if self.images is not None:
            tokens.append(self.images(obs["rgb"].to(device)))
        return self.fuse(tokens)

    def fuse(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """Concatenate the encoders' tokens and run the observation trunk over them."""
        tokens = torch.cat(tokens, 1)
        return self.fusion(tokens) if self.fusion is not None else tokens

    # ------------------------------------------------------------------ RL-facing API
    @property
    def stochastic_indices(self) -> list[int]:
        return self.noise.stochastic_indices

    def freeze_early_steps(self) -> None:
        """Run the deterministic early denoising steps with a frozen copy of the current head.

        DPPO fine-tunes only the last K' transitions; a frozen head for the earlier ones keeps the chunk
        at the start of the fine-tuned window where the pretrained policy put it. The observation
        encoders and trunk stay shared. Idempotent: a policy that already has its early head (e.g. a
        resumed checkpoint) keeps it, so resuming does not re-freeze at fine-tuned weights.
        """
        if self.early_head is None and self.stochastic_indices[0] > 0:  # K' = K: no early steps to freeze
            self.early_head = copy.deepcopy(self.head).requires_grad_(False)
            self.cfg.early_head = True

    def head_for_step(self, k: int) -> nn.Module:
        """The DiT head that runs denoising step k (the frozen early head before the stochastic window)."""
        if self.early_head is not None and k < self.stochastic_indices[0]:
            return self.early_head
        return self.head

    def run_head(self, head: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """One evaluation of an action head with its matmuls in ``cfg.head_dtype``; the output is float32.

        bfloat16 rounds the head's activations, not its float32 master weights. On the CPU (oneDNN) a row's
        result does not depend on the batch it is computed in (tests/test_policy.py), so the likelihood the
        rollout stores and the one the update recomputes at the same weights agree exactly; a GPU library
        that picks kernels by batch size may leave them within bfloat16 rounding of each other instead."""
        if not bfloat16_head(self.cfg.head_dtype, self.device):
            return head(x, t, cond)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return head(x, t, cond).float()

    def sample(self, obs: dict, deterministic: bool = False, generator=None, noise: torch.Tensor | None = None,
               init_noise: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> Chain:
        """Draw an action chunk. ``noise`` [B, K+1, H, A] fixes x_0 and every step's Gaussian draw.

        ``init_noise`` [B, H, A] sets x_K directly (DSRL's steered noise; the transitions are then
        deterministic); with a noise actor attached x_K comes from it (its mode when ``deterministic``,
        else a draw that uses ``noise[:, 0]`` as its standard normal) and the chain is deterministic.
        ``cond``: the observation's conditioning tokens when the caller has already encoded it."""
        cond = self.encode(obs) if cond is None else cond
        b = cond.shape[0]
        H, A, K = self.cfg.horizon, self.cfg.action_dim, self.noise.num_steps
        steered = init_noise is not None or self.noise_actor is not None
        stochastic = set() if deterministic or steered else set(self.stochastic_indices)
        if init_noise is not None:  # no random draw is needed at all
            if tuple(init_noise.shape) != (b, H, A):
                raise ObservationError(f"init_noise must be [{b}, {H}, {A}], got {tuple(init_noise.shape)}")
            x = init_noise.to(cond.device, torch.float32)
        else:
            if noise is None:
                noise = torch.randn((b, K + 1, H, A), generator=generator, device=cond.device)
            elif tuple(noise.shape) != (b, K + 1, H, A):
                raise ObservationError(f"noise must be [{b}, {K + 1}, {H}, {A}], got {tuple(noise.shape)}")
            x = self.initial_latent(cond, noise[:, 0], deterministic)
        latents, log_probs = [], []
        for k in range(K):
            kk = torch.full((b,), k, device=cond.device, dtype=torch.long)
            is_stoch = k in stochastic
            out = self.run_head(self.head_for_step(k), x, self.noise.model_time(kk), cond)
            mean, std = self.noise.transition(out, x, kk, is_stoch)
            if is_stoch:
                latents.append(x)
                x_next = mean + std * noise[:, k + 1]
                log_probs.append(gaussian_log_prob(x_next, mean, std))
                x = x_next
            else:
                x = mean
        latents.append(x)
        actions = self.normalizer.unnormalize_action(x.clamp(-1, 1))
        log_prob = torch.stack(log_probs, 1) if log_probs else torch.zeros(b, 0, device=cond.device)
        return Chain(actions=actions, latents=torch.stack(latents, 1), log_prob=log_prob)

    def log_prob(self, obs: dict, chain: Chain, per_dim: bool = False) -> torch.Tensor:
        """Log-likelihood [B, K'] of each stochastic transition in ``chain`` under the current weights;
        ``per_dim=True``: the per-coordinate Gaussian log-densities [B, K', H, A] (they sum to it)."""
        idx = self.stochastic_indices
        b, n = chain.latents.shape[0], len(idx)
        if chain.latents.shape[1] != n + 1:
            raise ValueError(f"chain has {chain.latents.shape[1] - 1} transitions, policy has {n} stochastic steps")
        cond = self.encode(obs)
        x_in = chain.latents[:, :-1].flatten(0, 1)  # [B*K', H, A], b-major
        x_out = chain.latents[:, 1:].flatten(0, 1)
        k = torch.tensor(idx, device=cond.device).repeat(b)
        out = self.run_head(self.head, x_in, self.noise.model_time(k), cond.repeat_interleave(n, 0))
        mean, std = self.noise.transition(out, x_in, k, stochastic=True)
        lp = gaussian_log_prob(x_out, mean, std, reduce=not per_dim)
        return lp.view(b, n, *lp.shape[1:])

    def drawn_actions(self, latents: torch.Tensor) -> torch.Tensor:
        """A chain's draw x_0 (``latents[:, -1]`` of :meth:`sample`'s chain) in action units, before the clamp to
        the action bounds that its executed ``actions`` went through: the target for regressing a policy onto
        samples. The clamp folds the tails of every dim the demos saturate onto the bound, so a regression on
        executed actions pulls those dims inward, a little more with every round."""
        return self.normalizer.unnormalize_action(latents[:, -1])

    def initial_latent(self, cond: torch.Tensor, noise0: torch.Tensor, deterministic: bool) -> torch.Tensor:
        """x_K from the standard-normal draw ``noise0`` [B, H, A]: scaled by ``init_scale``, or, with a DSRL
        noise actor, its draw b tanh(mean + std noise0) (its mode when ``deterministic``; "+ 0 * noise0"
        keeps an exported graph's noise input, which the runtime always feeds)."""
        if self.noise_actor is None:
            return noise0 * self.noise.init_scale
        feats = cond.flatten(1)
        if deterministic:
            return self.noise_actor.mode(feats) + 0.0 * noise0
        return self.noise_actor.sample(feats, eps=noise0)[0]

    def value(self, obs: dict) -> torch.Tensor:
        self.check_obs(obs, for_critic=True)
        device = self.device
        state = self.normalizer.normalize_state(obs["state"].to(device, torch.float32))
        language = self.language(list(obs["instruction"]))
        if self.language.kind == "hash":  # the critic must not move the actor's shared embedding
            language = language.detach()
        privileged = obs.get("privileged")
        privileged = privileged.to(device, torch.float32) if privileged is not None else None
        rgb = obs["rgb"].to(device) if self.critic.images is not None else None
        clock = None
        if self.critic.use_clock:
            if "episode_time" not in obs:
                raise ObservationError("the critic reads the episode clock: obs['episode_time'] [B] (fraction of "
                                       "the time limit used; vla_rl.runner adds it) is missing")
            clock = obs["episode_time"].to(device, torch.float32)
        return self.critic(state, privileged, language, rgb, clock)

    def enable_critic_clock(self) -> None:
        """Rebuild the (untrained after BC) critic so that it also reads ``obs["episode_time"]``."""
        if not self.cfg.critic_clock:
            self.cfg.critic_clock = True
            self.critic = Critic(self.cfg, self.language.out_dim).to(self.device)

    def bc_loss(self, obs: dict, actions: torch.Tensor, mask: torch.Tensor | None = None, generator=None,
                reduction: str = "mean"):
        """Denoising (DDPM epsilon) or flow-matching (velocity) regression loss on action chunks.

        ``reduction="none"`` gives one loss per sample ([B], masked mean over the chunk), e.g. for
        reward-weighted regression."""
        b = self.check_obs(obs)
        H, A = self.cfg.horizon, self.cfg.action_dim
        if tuple(actions.shape) != (b, H, A):
            raise ValueError(f"actions must be [B={b}, horizon={H}, action_dim={A}], got {tuple(actions.shape)}")
        if not torch.isfinite(actions).all():
            raise ValueError("actions contain NaN/inf")
        cond = self.encode(obs)
        x0 = self.normalizer.normalize_action(actions.to(cond.device, torch.float32))
        x_t, t, target = self.noise.training_target(x0, generator)
        err = (self.run_head(self.head, x_t, t, cond) - target).pow(2).mean(-1)  # [B, H]
        mask = torch.ones_like(err) if mask is None else mask.to(err.device, torch.float32)
        if reduction == "none":
            return (err * mask).sum(1) / mask.sum(1).clamp(min=1)
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        return (err * mask).sum() / mask.sum().clamp(min=1)

    def head_parameters(self) -> list[nn.Parameter]:
        """What fine-tuning the action head alone trains: the head (and the learned std, if any)."""
        return list(self.head.parameters()) + ([self.action_log_std] if self.action_log_std is not None else [])

    def actor_parameters(self, include_frozen: bool = False):
        """The actor's parameters, without the VLM weights its mode keeps fixed (frozen: all; LoRA: the base
        weights), so no optimizer or requires_grad switch ever reaches them."""
        frozen = self.vlm.frozen_parameters() if self.vlm is not None and not include_frozen else set()
        return [p for name, p in self.named_parameters()
                if not name.startswith(("critic.", "early_head.", "noise_actor.")) and id(p) not in frozen]

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, path, extra: dict | None = None) -> Path:
        """Write ``config.yaml``, ``model.safetensors``, ``normalization.json``, ``meta.json`` atomically."""
        from .. import __version__

        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        cfg, copy_vlm = self.cfg, False
        if self.vlm is not None:
            # The VLM's pretrained weights stay out of model.safetensors (only LoRA adapters, projector and
            # head go in): the backbone is referenced by absolute path + revision hash, or copied into
            # backbone/ (always for mode=full, whose VLM weights are the fine-tuned ones).
            base = {"vlm." + k for k in self.vlm.base_state_keys()}
            state = {k: v for k, v in state.items() if k not in base}
            cfg = copy.deepcopy(self.cfg)
            copy_vlm = cfg.vlm.mode == "full" or cfg.vlm.copy
            cfg.vlm.path = VLM_DIR if copy_vlm else str(self.vlm.directory.resolve())

        def write(tmp: Path):
            if copy_vlm:
                self.vlm.save_backbone(tmp / VLM_DIR)
                cfg.vlm.revision = revision_hash(tmp / VLM_DIR)
            OmegaConf.save(OmegaConf.structured(cfg), tmp / CONFIG_FILE)
            save_file(state, str(tmp / WEIGHTS_FILE))
            (tmp / NORM_FILE).write_text(json.dumps(self.normalizer.to_dict(), indent=1))
            meta = {"format_version": FORMAT_VERSION, "vla_rl_version": __version__, **(extra or {})}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1))

        return write_dir_atomically(path, write)

    @classmethod
    def from_pretrained(cls, path, device: str | torch.device = "cpu", **overrides) -> "VLAPolicy":
        """Load a policy directory written by ``save_pretrained``. ``overrides`` patch the config
        (e.g. ``noise={"stochastic_steps": 4}``) for things that do not change the weights."""
        path = require_files(path, [CONFIG_FILE, WEIGHTS_FILE, META_FILE])
        meta = read_json(path / META_FILE)
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format_version')!r}")
        try:
            saved = OmegaConf.load(path / CONFIG_FILE)
            if saved.get("backbone", "builtin") == "builtin" and "vlm" in saved:
                # Unused without the VLM: a builtin policy must not fail to load when the VLM options change.
                del saved["vlm"]
            if "gaussian_log_std" in saved.get("noise", {}):  # its name before the chain gained learn_std
                saved.noise.log_std_init = saved.noise.pop("gaussian_log_std")
            cfg = OmegaConf.merge(OmegaConf.structured(PolicyConfig), saved, overrides)
        except Exception as e:  # omegaconf raises several types; all mean a bad config file
            raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from e
        if cfg.backbone == "transformers" and cfg.vlm.path and not Path(cfg.vlm.path).is_absolute():
            cfg.vlm.path = str(path / cfg.vlm.path)  # a backbone copied into the policy directory
        policy = cls(cfg)
        try:
            weights = load_file(str(path / WEIGHTS_FILE))
        except Exception as e:
            raise CheckpointError(f"{path / WEIGHTS_FILE} is corrupt: {e}") from e
        try:
            missing, unexpected = policy.load_state_dict(weights, strict=False)
        except RuntimeError as e:  # shape mismatch, e.g. an action_dim that differs from the checkpoint
            raise CheckpointError(f"{path}: weights do not match the config: {e}") from e
        if policy.vlm is not None:  # the VLM's pretrained weights came from its own directory
            base = {"vlm." + k for k in policy.vlm.base_state_keys()}
            missing = [k for k in missing if k not in base]
        if cfg.noise.learn_std and cfg.noise.kind != "gaussian":
            # learn_std switched on for fine-tuning a chain trained without it: the std starts at exp(log_std_init)
            missing = [k for k in missing if k != "action_log_std"]
        if missing or unexpected:
            raise CheckpointError(f"{path}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
        return policy.to(device)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """log N(x; mean, std^2) summed over the chunk (H) and action (A) dims (``reduce=False``: per coordinate)."""
    std = std.expand_as(mean)
    var = std**2
    lp = -((x - mean) ** 2) / (2 * var) - std.log() - 0.5 * torch.log(torch.tensor(2 * torch.pi, device=x.device))
    return lp.sum((-1, -2)) if reduce else lp
