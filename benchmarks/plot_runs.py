"""Training success of RL runs against env steps and wall-clock minutes, from their TensorBoard event files.
Not a test; needs matplotlib (the `baselines` extra).

    python benchmarks/plot_runs.py --out benchmarks/results/curves.png \
        "DPPO (flow chain)=runs/demo_s0/dppo" "DPPO (flow chain)=runs/demo_s1/dppo" "Gaussian PPO=runs/gauss_s0/dppo"

Each argument is LABEL=RUN_DIR (a runner's log_dir, or any folder above its event files); runs sharing a label
share a colour. The curve is ``train/success_rate`` (the runner's unbiased success of the episodes each
iteration completed), smoothed over ``--window`` points. Minutes count from the end of the run's first
iteration (its first log of any scalar): training time less one iteration, BC and evaluation excluded; a resumed
run's minutes leave out the time it stood stopped (and one iteration per resume). Where
a run dir's parent holds a demo's ``summary.json``, its held-out sampled success before and after is marked at
the run's end.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_curve(run_dir: Path, tag: str = "train/success_rate") -> tuple[list[int], list[float], list[float]]:
    """(env steps, values, wall seconds of training) of ``tag`` over every event file below ``run_dir``, ordered
    by env step. Each process that logged (a run, then each resume of it) wrote its own event file; each file's
    clock starts at its first event and continues where the earlier files' ended, so the time a run stood
    stopped before a resume does not count."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = []
    for f in run_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags()["scalars"]
        times = [e.wall_time for t in tags for e in acc.Scalars(t)]
        if times:  # the clock starts at the file's first log, whatever it logged (success needs finished episodes)
            files.append((min(times), max(times), acc.Scalars(tag) if tag in tags else []))
    points, offset = [], 0.0
    for start, end, events in sorted(files, key=lambda f: f[0]):
        points += [(e.step, e.value, offset + e.wall_time - start) for e in events]
        offset += end - start
    if not points:
        raise SystemExit(f"no '{tag}' scalars under {run_dir}")
    points.sort()
    return [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (fewer at the start)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--title", default="place (state + language), outcome-only reward")
    a = p.parse_args()
    runs = []
    for spec in a.runs:
        label, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"expected LABEL=RUN_DIR, got {spec!r}")
        runs.append((label, Path(path)))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(label for label, _ in runs))}
    seen = set()
    for label, run in runs:
        steps, values, secs = read_curve(run)
        ys = smooth(values, a.window)
        first = label not in seen
        seen.add(label)
        for ax, xs in zip(axes, (steps, [s / 60 for s in secs])):
            ax.plot(xs, ys, color=colors[label], alpha=0.8, label=label if first else None)
        summary = run.parent / "summary.json"
        if summary.exists():  # a demo run: its held-out sampled success before (hollow) and after (filled)
            s = json.loads(summary.read_text())
            for ax, x in zip(axes, (steps[-1], secs[-1] / 60)):
                ax.plot([x], [s["before"]["sampled"]["success_rate"]], "o", mfc="none", color=colors[label])
                ax.plot([x], [s["after"]["sampled"]["success_rate"]], "o", color=colors[label])
    axes[0].xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1e3:.0f}k"))
    axes[0].set_xlabel("env steps")
    axes[1].set_xlabel("training wall-clock minutes")
    axes[0].set_ylabel(f"training success (sampled policy, {a.window}-point mean)")
    axes[0].set_ylim(-0.02, 1.02)
    fig.suptitle(a.title + "\n(markers at the end: held-out sampled success before (hollow) / after (filled))",
                 fontsize=10)
    axes[0].legend(fontsize=8)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110, bbox_inches="tight")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
