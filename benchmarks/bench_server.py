"""Policy server under abusive clients: a good client's act latency, unloaded vs. with idle connections
that never say hello plus one authenticated client (its own process) sending ever new oversized
instructions as fast as it gets replies, over real loopback sockets.

    python benchmarks/bench_server.py [--requests 300] [--idle 100] [--instruction-mb 1.5] [--repeats 3]

Policy: the tiny test policy (state 5, action 3, horizon 4, hash language, flow, K = 5). Each phase
times ``--requests`` acts of the good client after a warm-up, in blocks alternating with the flooding
client paused (after its last request was answered: the "unloaded" latency, idle connections still
open) and running; the ratio is
loaded / unloaded p99 ("alone": a first phase before the idle connections open, for reference).
``measure`` is shared with ``benchmarks/reliability_deploy.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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


FLOOD = """
import os, sys, time
import numpy as np
from vla_rl.deploy.protocol import pack
from vla_rl.deploy.server import PolicyClient
url, size, token, pause = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
base = " ".join(f"w{i % 5000}" for i in range(size // 5))
with PolicyClient(url, token, timeout=60) as bad:
    print("ready", flush=True)
    for n in range(10**9):  # ever new text (no cache hit), as fast as the replies come
        if os.path.exists(pause):  # paused only once the last request was answered
            print("paused", flush=True)
            while os.path.exists(pause):
                time.sleep(0.005)
        text = (f"{n} " + base)[:size]
        bad.request_raw(pack({"type": "act", "observation": {"state": np.zeros(5, np.float32), "instruction": text}}))
        print(n + 1, flush=True)
"""


class Flood:
    """An authenticated client sending ever new oversized instructions, in its own process (as a remote
    client would be: its own packing costs the server nothing); ``pause`` returns once the server has
    answered its last request."""

    def __init__(self, url: str, size: int, flag: Path):
        self.flag, self.answered = flag, 0
        self.proc = subprocess.Popen([sys.executable, "-c", FLOOD, url, str(size), TOKEN, str(flag)],
                                     stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the flooding client did not connect")

    def pause(self) -> None:
        self.flag.touch()
        while (line := self.proc.stdout.readline().strip()) != "paused":
            if not line:
                raise RuntimeError("the flooding client died")
            self.answered += line.isdigit()

    def resume(self) -> None:
        self.flag.unlink()

    def stop(self) -> int:
        self.proc.kill()
        self.answered += sum(w.isdigit() for w in self.proc.communicate(timeout=30)[0].split())
        return self.answered


def measure(runtime: PolicyRuntime, requests: int = 300, idle: int = 100, instruction_bytes: int = 1_500_000,
            warmup: int = 30, blocks: int = 10) -> dict:
    """Unloaded and loaded latency (seconds) of a good client; the server uses its default limits except
    ``max_connections`` (room for the idle ones) and a hello timeout longer than the measurement."""
    try:
        server = start_server_thread(runtime, port=0, token=TOKEN, max_connections=idle + 8, hello_timeout_s=120)
    except TypeError:  # a server from before these limits (for the before/after comparison)
        server = start_server_thread(runtime, port=0, token=TOKEN)
    idle_conns, flood, unloaded, loaded = [], None, [], []
    try:
        with PolicyClient(server.url, TOKEN, session={"seed": 1}) as good:
            timed_acts(good, warmup)
            alone = timed_acts(good, requests)  # no idle connection, no flood
            idle_conns = [connect(server.url, open_timeout=30) for _ in range(idle)]
            flood = Flood(server.url, instruction_bytes, Path(tempfile.mkdtemp()) / "pause")
            # Alternate blocks with the flood paused and running, so that the load of other processes
            # on the machine, which drifts over seconds, falls on both alike.
            for _ in range(blocks):
                flood.pause()
                unloaded.append(timed_acts(good, requests // blocks))
                flood.resume()
                time.sleep(0.05)
                loaded.append(timed_acts(good, requests // blocks))
            sent = flood.stop()
    finally:
        if flood is not None and flood.proc.poll() is None:
            flood.proc.kill()
        for c in idle_conns:
            c.close()
        server.stop()
    unloaded, loaded = np.concatenate(unloaded), np.concatenate(loaded)
    return {"alone": alone, "unloaded": unloaded, "loaded": loaded, "bad_requests": sent}


def summary(r: dict) -> dict:
    ms = {k: np.asarray(r[k]) * 1e3 for k in ("alone", "unloaded", "loaded")}
    out = {f"{k}_{q}_ms": float(np.percentile(v, p)) for k, v in ms.items() for q, p in (("p50", 50), ("p99", 99))}
    out["p99_ratio"] = out["loaded_p99_ms"] / out["unloaded_p99_ms"]
    out["p50_ratio"] = out["loaded_p50_ms"] / out["unloaded_p50_ms"]
    out["p99_ratio_vs_alone"] = out["loaded_p99_ms"] / out["alone_p99_ms"]
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
