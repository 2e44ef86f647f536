"""Policy server under abusive clients: a good client's act latency, unloaded vs. with idle connections
that never say hello plus one authenticated client sending oversized instructions, over real loopback
sockets (same process: server threads, clients and load share the GIL, as on a small robot computer).

    python benchmarks/bench_server.py [--requests 300] [--idle 100] [--instruction-mb 1.5] [--repeats 3]

Policy: the tiny test policy (state 5, action 3, horizon 4, hash language, flow, K = 5). Each phase
times ``--requests`` acts of the good client after a warm-up; the ratio is loaded / unloaded p99.
``measure`` is shared with ``benchmarks/reliability_deploy.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_export import tiny_policy  # noqa: E402

from vla_rl.deploy import PolicyRuntime  # noqa: E402
from vla_rl.deploy.server import PolicyClient, start_server_thread  # noqa: E402
from vla_rl.export import export_bundle  # noqa: E402

TOKEN = "bench"


def obs(i: int) -> dict:
    return {"state": np.linspace(-1, 1, 5, dtype=np.float32) * (1 + i % 3), "instruction": "open the drawer"}


def timed_acts(client: PolicyClient, n: int) -> np.ndarray:
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        client.act(obs(i))
        out[i] = time.perf_counter() - t0
    return out


def flood(url: str, stop: threading.Event, size: int, sent: list) -> None:
    """An authenticated client sending ever new oversized instructions, as fast as replies come."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(5000)]
    base = " ".join(rng.choice(words, size // 6))
    with PolicyClient(url, TOKEN, timeout=60) as bad:
        while not stop.is_set():
            text = f"{len(sent)} {base}"[:size]  # new text each time: no cache hit
            bad.request_raw(bad_pack(text))
            sent.append(len(text))


def bad_pack(text: str) -> bytes:
    from vla_rl.deploy.protocol import pack

    return pack({"type": "act", "observation": {"state": np.zeros(5, np.float32), "instruction": text}})


def measure(runtime: PolicyRuntime, requests: int = 300, idle: int = 100, instruction_bytes: int = 1_500_000,
            warmup: int = 30) -> dict:
    """Unloaded and loaded latency (seconds) of a good client; the server uses its default limits except
    ``max_connections`` (room for the idle ones) and a hello timeout longer than the measurement."""
    try:
        server = start_server_thread(runtime, port=0, token=TOKEN, max_connections=idle + 8, hello_timeout_s=120)
    except TypeError:  # a server from before these limits (for the before/after comparison)
        server = start_server_thread(runtime, port=0, token=TOKEN)
    idle_conns, stop, sent = [], threading.Event(), []
    try:
        with PolicyClient(server.url, TOKEN, session={"seed": 1}) as good:
            timed_acts(good, warmup)
            unloaded = timed_acts(good, requests)
            idle_conns = [connect(server.url, open_timeout=30) for _ in range(idle)]
            bad = threading.Thread(target=flood, args=(server.url, stop, instruction_bytes, sent), daemon=True)
            bad.start()
            time.sleep(0.3)  # the flood is running
            loaded = timed_acts(good, requests)
            stop.set()
            bad.join(timeout=120)
    finally:
        stop.set()
        for c in idle_conns:
            c.close()
        server.stop()
    return {"unloaded": unloaded, "loaded": loaded, "bad_requests": len(sent)}


def summary(r: dict) -> dict:
    ms = {k: np.asarray(r[k]) * 1e3 for k in ("unloaded", "loaded")}
    out = {f"{k}_{q}_ms": float(np.percentile(v, p)) for k, v in ms.items() for q, p in (("p50", 50), ("p99", 99))}
    out["p99_ratio"] = out["loaded_p99_ms"] / out["unloaded_p99_ms"]
    out["p50_ratio"] = out["loaded_p50_ms"] / out["unloaded_p50_ms"]
    out["bad_requests"] = r["bad_requests"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--idle", type=int, default=100)
    ap.add_argument("--instruction-mb", type=float, default=1.5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            bundle = export_bundle(tiny_policy("flow"), Path(tmp) / "b", hold="last")
        except TypeError:  # an exporter from before the declared hold
            bundle = export_bundle(tiny_policy("flow"), Path(tmp) / "b")
        runtime = PolicyRuntime.load(bundle)
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            s = summary(measure(runtime, args.requests, args.idle, int(args.instruction_mb * 1e6)))
            print(json.dumps({"repeat": rep, **{k: round(v, 3) for k, v in s.items()},
                              "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
