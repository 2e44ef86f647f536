"""Policy evaluation: success rate with a Wilson 95% interval, returns, per-randomization-factor slices."""

from __future__ import annotations

import math

import torch


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, c - h), min(1.0, c + h))


@torch.no_grad()
def evaluate(policy, env, num_episodes: int, deterministic: bool = False, seed: int | None = None,
             bins: int = 3, video_path: str | None = None, max_decisions: int = 10_000) -> dict:
    """Run until ``num_episodes`` episodes finished; returns success rate, its Wilson CI, mean return and
    length, and ``by_factor`` (success per quantile bin of each scalar ``info["randomization"]`` factor)."""
    obs = env.reset(seed=seed)
    succ, rets, lens, factors, frames = [], [], [], {}, []
    g = torch.Generator(device=env.device).manual_seed(seed or 0)
    exec_steps = policy.cfg.exec_steps
    for _ in range(max_decisions):
        chain = policy.sample(obs, deterministic=deterministic, generator=g)
        obs, _r, term, trunc, info = env.step(chain.actions[:, :exec_steps])
        if video_path and "rgb" in obs:
            frames.append(obs["rgb"][0, 0].permute(1, 2, 0).cpu().numpy())
        ended = (term | trunc).nonzero().flatten().tolist()
        for i in ended:
            succ.append(bool(info["success"][i]))
            rets.append(float(info["episode_return"][i]))
            lens.append(int(info["episode_length"][i]))
            for k, v in (info.get("randomization") or {}).items():
                if isinstance(v, torch.Tensor) and v.dim() == 1:
                    factors.setdefault(k, []).append(float(v[i]))
        if len(succ) >= num_episodes:
            break
    succ, rets, lens = succ[:num_episodes], rets[:num_episodes], lens[:num_episodes]
    n, k = len(succ), sum(succ)
    out = {"success_rate": k / max(n, 1), "success_ci95": wilson_interval(k, n), "num_episodes": n,
           "mean_return": sum(rets) / max(n, 1), "mean_length": sum(lens) / max(n, 1), "by_factor": {}}
    for name, vals in factors.items():
        v = torch.tensor(vals[:n])
        edges = torch.quantile(v, torch.linspace(0, 1, bins + 1))
        b = torch.bucketize(v, edges[1:-1])
        s = torch.tensor(succ, dtype=torch.float32)
        out["by_factor"][name] = [{"low": edges[i].item(), "high": edges[i + 1].item(), "n": int((b == i).sum()),
                                   "success_rate": s[b == i].mean().item() if (b == i).any() else float("nan")}
                                  for i in range(bins)]
    if video_path:
        if not frames:
            print(f"evaluate: no rgb observations, video {video_path} not written")
        else:
            try:
                import imageio
                imageio.mimsave(video_path, frames, fps=10)
            except ImportError:
                print(f"evaluate: imageio is not installed, video {video_path} not written (pip install imageio[ffmpeg])")
    return out
