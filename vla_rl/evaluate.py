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
    """Run the torch policy until ``num_episodes`` episodes finished; returns success rate, its Wilson CI,
    mean return and length, and ``by_factor`` (success per quantile bin of each scalar
    ``info["randomization"]`` factor)."""
    g = torch.Generator(device=env.device).manual_seed(seed or 0)

    def act(obs, _ended_ids):  # one decision = one chunk, executed open-loop by the env
        return policy.sample(obs, deterministic=deterministic, generator=g).actions[:, : policy.cfg.exec_steps]

    return run_episodes(env, act, num_episodes, seed, bins, video_path, max_decisions)


@torch.no_grad()
def evaluate_bundle(runtime, env, num_episodes: int, seed: int | None = None, bins: int = 3,
                    video_path: str | None = None, max_steps: int = 100_000, **session_kwargs) -> dict:
    """Close the loop through an exported bundle (``vla_rl.deploy.PolicyRuntime``): every env gets its own
    ``ControlSession`` (action queue or ensembling + safety filter), stepped one control step at a time,
    so the artifact that goes to the robot is the one evaluated. Adds ``holds`` (safety holds), ``control_steps``
    (decisions made) and ``hold_reasons`` (reason -> count)."""
    import numpy as np

    from collections import Counter

    base = 0 if seed is None else seed
    sessions = [runtime.session(seed=base + i, **session_kwargs) for i in range(env.num_envs)]
    holds, steps, reasons = 0, 0, Counter()

    def act(obs, ended_ids):
        nonlocal holds, steps
        for i in ended_ids:  # a new episode starts with an empty queue and fresh safety state
            sessions[i].reset()
        state = obs["state"].cpu().numpy()
        rgb = obs["rgb"].cpu().numpy() if "rgb" in obs else None
        actions = np.zeros((env.num_envs, runtime.action_dim), np.float32)
        for i, session in enumerate(sessions):
            robot_obs = {"state": state[i], "instruction": obs["instruction"][i]}
            if rgb is not None:
                robot_obs["rgb"] = rgb[i]
            decision = session.act(robot_obs)
            steps += 1
            if decision.status != "ok":
                holds += 1
                reasons.update(decision.reasons or ["(no reason given)"])
            if decision.action is not None:  # nothing safe to send: a zero command (delta control holds)
                actions[i] = decision.action
        return torch.from_numpy(actions).to(env.device)

    out = run_episodes(env, act, num_episodes, seed, bins, video_path, max_steps)
    out.update(holds=holds, control_steps=steps, hold_reasons=dict(reasons.most_common()))
    return out


def run_episodes(env, act, num_episodes: int, seed, bins: int, video_path, max_calls: int) -> dict:
    """Step ``env`` with ``act(obs, ids of envs that just started a new episode)`` until every env has
    finished its quota of episodes, and summarize them."""
    if not (isinstance(num_episodes, int) and num_episodes > 0):
        raise ValueError(f"num_episodes must be an integer > 0, got {num_episodes!r}")
    obs = env.reset(seed=seed)
    succ, rets, lens, factors, frames = [], [], [], {}, []
    # Each env contributes a fixed quota of episodes: taking the first N episodes to finish would
    # over-count short (typically successful) episodes and bias the success rate upward.
    quota = torch.full((env.num_envs,), num_episodes // env.num_envs, dtype=torch.long)
    quota[: num_episodes % env.num_envs] += 1
    done_count = torch.zeros(env.num_envs, dtype=torch.long)
    just_reset = list(range(env.num_envs))
    for _ in range(max_calls):
        obs, _r, term, trunc, info = env.step(act(obs, just_reset))
        if video_path and "rgb" in obs:
            frames.append(obs["rgb"][0, 0].permute(1, 2, 0).cpu().numpy())
        finished = (term | trunc).cpu()
        just_reset = finished.nonzero().flatten().tolist()
        for i in (finished & (done_count < quota)).nonzero().flatten().tolist():
            done_count[i] += 1
            succ.append(bool(info["success"][i]))
            rets.append(float(info["episode_return"][i]))
            lens.append(int(info["episode_length"][i]))
            for k, v in (info.get("randomization") or {}).items():
                if isinstance(v, torch.Tensor) and v.dim() == 1:
                    factors.setdefault(k, []).append(float(v[i]))
        if bool((done_count >= quota).all()):
            break
    n, k = len(succ), sum(succ)
    out = {"success_rate": k / max(n, 1), "success_ci95": wilson_interval(k, n), "num_episodes": n,
           "mean_return": sum(rets) / max(n, 1), "mean_length": sum(lens) / max(n, 1), "by_factor": {}}
    for name, vals in factors.items():
        v = torch.tensor(vals[:n])
        edges = torch.quantile(v, torch.linspace(0, 1, bins + 1))
        b = torch.bucketize(v, edges[1:-1])
        s = torch.tensor(succ, dtype=torch.float32)
        # Repeated quantile edges (a factor with few distinct values) leave empty bins: not reported.
        out["by_factor"][name] = [{"low": edges[i].item(), "high": edges[i + 1].item(), "n": int((b == i).sum()),
                                   "success_rate": s[b == i].mean().item()}
                                  for i in range(bins) if (b == i).any()]
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
