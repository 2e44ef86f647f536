"""Noise processes: swappable objects that define training targets and the denoising chain.

Both processes expose the chain as K transitions x_k -> x_{k+1} (k = 0 is pure noise, x_K the clean
action chunk, in normalized units). ``transition`` returns the mean and std of each Gaussian step, so
the RL algorithms get an exact log-likelihood of every stochastic transition:

* :class:`DDIMProcess`: trained as DDPM (epsilon or clean-sample prediction, cosine schedule); sampled with
  DDIM at K steps, eta > 0 giving a stochastic step of std sigma_t (Song et al. 2021, eq. 12).
* :class:`FlowSDEProcess`: rectified flow (velocity prediction, x_t = t a + (1 - t) eps); sampled
  with Euler-Maruyama on the SDE that has the flow's marginals (drift corrected by the score, as in
  Flow-SDE / ReinFlow-style fine-tuning), each step Gaussian with std sigma_t sqrt(dt).

* :class:`GaussianProcess`: no diffusion at all: a one-step "chain" whose only transition is a Gaussian
  around the head's output (std learned per action dimension). It is the plain Gaussian policy that every
  diffusion-RL comparison needs as its control, run by the same encoders, head network, runner and
  algorithms, so that a comparison changes one thing: the action distribution.

A std floor keeps every stochastic step exploratory; only the last ``stochastic_steps`` transitions
are stochastic, the earlier ones are the deterministic (eta = 0 / ODE) updates. With ``learn_std`` the
stochastic transitions of a DDIM or flow chain draw with the policy's learned per-dimension std (floored
at ``std_floor``) in place of the schedule's, so PPO can narrow its exploration as it learns, as a
Gaussian policy does (DPPO's learned eta plays the same role).
"""

from __future__ import annotations

import math

import torch

from .config import NoiseConfig


class NoiseProcess:
    def __init__(self, cfg: NoiseConfig, log_std: torch.Tensor | None = None):
        if cfg.sample_steps < 1:
            raise ValueError(f"noise.sample_steps must be >= 1, got {cfg.sample_steps}")
        if not 0 <= cfg.stochastic_steps <= cfg.sample_steps:
            raise ValueError(
                f"noise.stochastic_steps must be in [0, sample_steps={cfg.sample_steps}], got {cfg.stochastic_steps}"
            )
        if cfg.std_floor < 0 or cfg.eta < 0 or cfg.init_scale < 0:
            raise ValueError("noise.std_floor, noise.eta and noise.init_scale must be >= 0")
        if cfg.learn_std and log_std is None:
            raise ValueError("noise.learn_std needs the policy's log_std parameter")
        self.cfg = cfg
        self.log_std = log_std if cfg.learn_std or cfg.kind == "gaussian" else None
        self.num_steps = cfg.sample_steps
        n_stoch = cfg.stochastic_steps or cfg.sample_steps
        # Indices (in 0..K-1) of the stochastic transitions: the last K' of the chain.
        self.stochastic_indices = list(range(cfg.sample_steps - n_stoch, cfg.sample_steps))

    @property
    def init_scale(self) -> float:
        """Std of x_K (read from the config each time: a policy's sampling temperature may be changed live)."""
        return self.cfg.init_scale

    def model_time(self, k: torch.Tensor) -> torch.Tensor:
        """Network time input in [0, 1] for chain step index k (long tensor)."""
        raise NotImplementedError

    def training_target(self, x0: torch.Tensor, generator=None):
        """Return (x_t, t in [0,1] per sample, regression target) for one training step."""
        raise NotImplementedError

    def transition(self, model_out: torch.Tensor, x: torch.Tensor, k: torch.Tensor, stochastic: bool):
        """Mean and std of x_{k+1} given x_k and the network output. k: long [B]. std broadcasts to mean."""
        raise NotImplementedError

    def stochastic_std(self, schedule_std: torch.Tensor | None) -> torch.Tensor:
        """The std of a stochastic transition: the learned one per action dimension when there is one, else the
        schedule's; floored at std_floor either way."""
        if self.log_std is not None:
            return self.log_std.exp().clamp(min=self.cfg.std_floor).view(1, 1, -1)
        return schedule_std.clamp(min=self.cfg.std_floor)


class DDIMProcess(NoiseProcess):
    def __init__(self, cfg: NoiseConfig, log_std: torch.Tensor | None = None):
        super().__init__(cfg, log_std)
        T = cfg.train_steps
        if cfg.prediction not in ("epsilon", "sample"):
            raise ValueError(f"noise.prediction must be 'epsilon' or 'sample', got {cfg.prediction!r}")
        if T < cfg.sample_steps:
            raise ValueError(f"noise.train_steps ({T}) must be >= sample_steps ({cfg.sample_steps})")
        # Cosine schedule (Nichol & Dhariwal 2021): alpha_bar(t) = cos^2(((t/T)+s)/(1+s) * pi/2) / f(0).
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64)
        f = torch.cos(((steps / T) + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
        self.alpha_bar = torch.cumprod(1 - betas, 0).float()  # [T], index t = diffusion step t+1
        # DDIM timesteps from the noisiest to 0; the step after the last has alpha_bar = 1.
        ts = torch.linspace(T - 1, 0, cfg.sample_steps).round().long()
        self.timesteps = ts
        self.alpha_t = self.alpha_bar[ts]
        self.alpha_prev = torch.cat([self.alpha_bar[ts[1:]], torch.ones(1)])

    def model_time(self, k):
        return self.timesteps.to(k.device)[k].float() / self.cfg.train_steps

    def training_target(self, x0, generator=None):
        b = x0.shape[0]
        t = torch.randint(0, self.cfg.train_steps, (b,), device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
        a = self.alpha_bar.to(x0.device)[t].view(b, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        return x_t, t.float() / self.cfg.train_steps, (x0 if self.cfg.prediction == "sample" else eps)

    def transition(self, out, x, k, stochastic):
        shape = (-1, 1, 1)
        a_t = self.alpha_t.to(x.device)[k].view(shape)
        a_prev = self.alpha_prev.to(x.device)[k].view(shape)
        if self.cfg.prediction == "sample":
            x0 = out
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        else:
            eps = out
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if self.cfg.clip_sample > 0:
            x0 = x0.clamp(-self.cfg.clip_sample, self.cfg.clip_sample)
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        eta = self.cfg.eta if stochastic else 0.0
        sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).clamp(min=0).sqrt()
        direction = (1 - a_prev - sigma**2).clamp(min=0).sqrt()
        mean = a_prev.sqrt() * x0 + direction * eps
        std = self.stochastic_std(sigma) if stochastic else torch.zeros_like(sigma)
        return mean, std


class FlowSDEProcess(NoiseProcess):
    def __init__(self, cfg: NoiseConfig, log_std: torch.Tensor | None = None):
        super().__init__(cfg, log_std)
        self.dt = 1.0 / cfg.sample_steps

    def model_time(self, k):
        return k.float() * self.dt

    def training_target(self, x0, generator=None):
        b = x0.shape[0]
        t = torch.rand((b,), device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
        tt = t.view(b, 1, 1)
        x_t = tt * x0 + (1 - tt) * eps
        return x_t, t, x0 - eps

    def transition(self, v, x, k, stochastic):
        dt = self.dt
        t = (k.float() * dt).view(-1, 1, 1).to(x.device)
        if not stochastic:
            return x + v * dt, torch.zeros_like(t)
        # sigma_t^2 = eta^2 (1 - t) / (t + dt); the score of x_t is -(x - t v) / (1 - t), so the
        # marginal-preserving drift v + sigma^2/2 * score simplifies to v - eta^2 (x - t v) / (2 (t + dt)).
        eta2 = self.cfg.eta**2
        drift = v - eta2 * (x - t * v) / (2 * (t + dt))
        mean = x + drift * dt
        sigma = (eta2 * (1 - t) / (t + dt)).sqrt()
        return mean, self.stochastic_std(sigma * math.sqrt(dt))


class GaussianProcess(NoiseProcess):
    """A Gaussian policy as a one-step chain: x_K = 0 enters the head at t = 0, its output is the mean of
    the chunk and the one transition draws N(mean, std^2) with std = exp(log_std) per action dimension
    (``log_std``: the policy's learned parameter, floored at ``std_floor``). BC is MSE regression on the
    chunk; DPPO on it is plain PPO with a state-independent learned std."""

    def __init__(self, cfg: NoiseConfig, log_std: torch.Tensor | None):
        if cfg.sample_steps != 1:
            raise ValueError(f"noise.kind='gaussian' is a one-step chain: noise.sample_steps must be 1, got {cfg.sample_steps}")
        if log_std is None:
            raise ValueError("noise.kind='gaussian' needs the policy's log_std parameter")
        super().__init__(cfg, log_std)

    @property
    def init_scale(self) -> float:
        return 0.0  # the head reads no noise

    def model_time(self, k):
        return torch.zeros(k.shape, device=k.device)

    def training_target(self, x0, generator=None):
        return torch.zeros_like(x0), torch.zeros(x0.shape[0], device=x0.device), x0

    def transition(self, mean, x, k, stochastic):
        if not stochastic:
            return mean, torch.zeros(1, 1, 1, device=mean.device)
        return mean, self.stochastic_std(None)


def make_noise_process(cfg: NoiseConfig, log_std: torch.Tensor | None = None) -> NoiseProcess:
    """``log_std``: the learned per-dimension log std (owned by the policy) of the ``gaussian`` kind, or of any
    kind with ``learn_std``."""
    processes = {"ddim": DDIMProcess, "flow": FlowSDEProcess, "gaussian": GaussianProcess}
    if cfg.kind not in processes:
        raise ValueError(f"unknown noise.kind {cfg.kind!r}; choose one of {sorted(processes)}")
    return processes[cfg.kind](cfg, log_std)
