"""Reliability of the deploy side: bad inputs and faults against bundles/manifests, export, the safety
filter and the policy server, each run for real (real files, ONNX Runtime, loopback sockets) and classified:

* clear error          refused with a named error (exception, error reply, close code, hold reason, exit 2)
* accepted correctly   a valid edge case that works as specified
* traceback            an unexpected exception type / crash
* silent wrong result  went through but did the wrong thing (e.g. a hold that moves the arm)
* data lost            a good artifact was destroyed

    python benchmarks/reliability_deploy.py [--no-latency] [--requests 300]

Prints one markdown row per case, totals by area, and (unless --no-latency) the good client's p99 under
100 idle connections + one client sending 1.5 MB instructions (``bench_server.measure``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_server import measure, summary  # noqa: E402
from test_export import tiny_policy  # noqa: E402

from vla_rl.deploy import BundleError, PolicyRuntime, SafetyFilter  # noqa: E402
from vla_rl.deploy.protocol import pack, unpack  # noqa: E402
from vla_rl.deploy.server import PolicyClient, PolicyServerError, ServeError, start_server_thread  # noqa: E402
from vla_rl.export import export_bundle  # noqa: E402

CLEAR, OK, TRACE, SILENT, LOST = "clear error", "accepted correctly", "traceback", "silent wrong result", "data lost"
NAMED = (ValueError, PolicyServerError)  # BundleError, ServeError, EnvError are ValueErrors
CASES: list[tuple[str, str, object]] = []
TOKEN = "rel"


def case(area: str, name: str):
    def register(fn):
        CASES.append((area, name, fn))
        return fn
    return register


def expect_error(fn, *needles) -> tuple[str, str]:
    """CLEAR when ``fn`` raises a named error mentioning every needle; SILENT when it does not raise."""
    try:
        fn()
    except NAMED as e:
        msg = str(e)
        missing = [n for n in needles if n not in msg]
        return (CLEAR if not missing else TRACE), msg[:110]
    except Exception as e:
        return TRACE, f"{type(e).__name__}: {e}"[:110]
    return SILENT, "accepted"


# ---------------------------------------------------------------------- fixtures
class Fix:
    tmp: Path
    bundle: Path
    runtime: PolicyRuntime
    server = None


def edited(edit) -> Path:
    out = Path(tempfile.mkdtemp(dir=Fix.tmp))
    shutil.rmtree(out)
    shutil.copytree(Fix.bundle, out)
    m = json.loads((out / "manifest.json").read_text())
    edit(m)
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def setter(path: str, value):
    def edit(m):
        *keys, last = path.split(".")
        d = m
        for k in keys:
            d = d[k]
        if value is None:
            d.pop(last)
        else:
            d[last] = value
    return edit


# ---------------------------------------------------------------------- bundle / manifest
MANIFEST_FAULTS = [
    ("low > high", "safety.action_low", [3.0, 0.0, 0.5], "action_low[0]=3.0 > action_high[0]"),
    ("missing safety block", "safety", None, "'safety'"),
    ("safety block not an object", "safety", "none", "safety"),
    ("horizon 0", "chunking.horizon", 0, "chunking.horizon"),
    ("horizon as a string", "chunking.horizon", "4", "chunking.horizon"),
    ("exec_steps > horizon", "chunking.exec_steps", 9, "chunking.exec_steps"),
    ("negative control rate", "chunking.control_hz", -10, "chunking.control_hz"),
    ("action_high a string", "safety.action_high", "abc", "safety.action_high"),
    ("action_high wrong length", "safety.action_high", [1, 2], "safety.action_high"),
    ("null inside action_low", "safety.action_low", [-1, None, 0.5], "safety.action_low[1]"),
    ("negative max_delta", "safety.max_delta", [0.1, -1, 0.1], "safety.max_delta"),
    ("watchdog a string", "safety.watchdog_timeout_s", "soon", "safety.watchdog_timeout_s"),
    ("require_timestamp a string", "safety.require_timestamp", "yes", "safety.require_timestamp"),
    ("unknown hold rule", "action.hold", ["last", "stop", "last"], "action.hold[1]"),
    ("zero hold outside bounds", "action.hold", ["zero"] * 3, "action.hold[2]"),
    ("old bundle without action.hold", "action.hold", None, "Re-export"),
    ("action.dim a bool", "action.dim", True, "action.dim"),
    ("files not an object", "files", [], "files"),
    ("unknown format_version", "format_version", 7, "format_version"),
    ("state_dim negative", "observation.state_dim", -5, "observation.state_dim"),
    ("denoising steps missing", "denoising.steps", None, "denoising.steps"),
]

for _name, _path, _value, _needle in MANIFEST_FAULTS:
    def _run(path=_path, value=_value, needle=_needle):
        return expect_error(lambda: PolicyRuntime.load(edited(setter(path, value))), needle)
    case("bundle/manifest", _name)(_run)


@case("bundle/manifest", "bundle directory missing")
def _():
    return expect_error(lambda: PolicyRuntime.load(Fix.tmp / "nope"), "not found")


@case("bundle/manifest", "manifest.json not JSON")
def _():
    out = edited(lambda m: None)
    (out / "manifest.json").write_text("{not json")
    return expect_error(lambda: PolicyRuntime.load(out), "manifest.json")


@case("bundle/manifest", "tampered language table (checksum)")
def _():
    out = edited(lambda m: None)
    t = np.load(out / "language_hash.npy")
    t[0, 0] += 1
    np.save(out / "language_hash.npy", t)
    return expect_error(lambda: PolicyRuntime.load(out), "language_hash.npy")


@case("bundle/manifest", "policy.onnx truncated, checksums off")
def _():
    out = edited(lambda m: None)
    data = (out / "policy.onnx").read_bytes()
    (out / "policy.onnx").write_bytes(data[: len(data) // 2])
    return expect_error(lambda: PolicyRuntime.load(out, verify=False), "cannot load the graphs")


@case("bundle/manifest", "old bundle with an explicit hold_action")
def _():
    def edit(m):
        del m["action"]["hold"]
        m["safety"]["hold_action"] = [0.0, 1.0, 1.0]
    s = PolicyRuntime.load(edited(edit)).session()
    s.act(obs())
    a = s.act({**obs(), "state": np.full(5, np.nan, np.float32)}).action
    return (OK, "holds its hold_action") if a is not None and a.tolist() == [0.0, 1.0, 1.0] else (SILENT, str(a))


# ---------------------------------------------------------------------- export
def run_checkpoint(task="place", action_dim=4) -> Path:
    root = Path(tempfile.mkdtemp(dir=Fix.tmp))
    tiny_policy("ddim", action_dim=action_dim).save_pretrained(root / "checkpoint" / "policy")
    (root / "checkpoint" / "state.json").write_text(json.dumps({"config": {"env": {"task": task}}}))
    return root / "checkpoint" / "policy"


def export_cli(*argv) -> tuple[int, str]:
    import contextlib
    import io

    from vla_rl.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(["export", *map(str, argv)])
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ""


@case("export", "built-in task run, no flags: hold declared")
def _():
    out = Fix.tmp / "exp_place"
    code, _ = export_cli(run_checkpoint(), "--out", out)
    hold = json.loads((out / "manifest.json").read_text())["action"]["hold"] if code == 0 else None
    return (OK, f"hold {hold}") if hold == ["zero", "zero", "zero", "last"] else (SILENT, f"exit {code}, hold {hold}")


@case("export", "action space without a hold (pretrain checkpoint)")
def _():
    ckpt = Fix.tmp / "pre"
    tiny_policy("flow").save_pretrained(ckpt)
    code, msg = export_cli(ckpt, "--out", Fix.tmp / "exp_pre")
    return (CLEAR, msg[:110]) if code == 2 and "--hold" in msg else (SILENT if code == 0 else TRACE, msg)


@case("export", "--hold zero outside the demo-range bounds")
def _():
    code, msg = export_cli(Fix.tmp / "pre", "--out", Fix.tmp / "exp_pre", "--hold", "zero")
    return (CLEAR, msg[:110]) if code == 2 and "hold[2]" in msg else (SILENT if code == 0 else TRACE, msg)


@case("export", "--hold with an unknown rule")
def _():
    code, msg = export_cli(Fix.tmp / "pre", "--out", Fix.tmp / "exp_pre", "--hold", "stop")
    return (CLEAR, msg[:110]) if code == 2 and "hold" in msg else (SILENT if code == 0 else TRACE, msg)


@case("export", "--task whose action_dim differs")
def _():
    code, msg = export_cli(Fix.tmp / "pre", "--out", Fix.tmp / "exp_pre", "--task", "place")
    return (CLEAR, msg[:110]) if code == 2 and "action_dim" in msg else (SILENT if code == 0 else TRACE, msg)


@case("export", "--task unknown")
def _():
    code, msg = export_cli(Fix.tmp / "pre", "--out", Fix.tmp / "exp_pre", "--task", "juggle")
    return (CLEAR, msg[:110]) if code == 2 and "juggle" in msg else (SILENT if code == 0 else TRACE, msg)


@case("export", "--action-low > --action-high")
def _():
    code, msg = export_cli(Fix.tmp / "pre", "--out", Fix.tmp / "exp_pre", "--hold", "last", "--action-low", "1",
                           "--action-high", "-1")
    return (CLEAR, msg[:110]) if code == 2 and "low" in msg else (SILENT if code == 0 else TRACE, msg)


@case("export", "--max-delta 0")
def _():
    code, msg = export_cli(Fix.tmp / "pre", "--out", Fix.tmp / "exp_pre", "--hold", "last", "--max-delta", "0")
    return (CLEAR, msg[:110]) if code == 2 and "max_delta" in msg else (SILENT if code == 0 else TRACE, msg)


@case("export", "failed export over an existing bundle")
def _():
    out = Fix.tmp / "exp_place"
    before = (out / "manifest.json").read_bytes()
    code, msg = export_cli(Fix.tmp / "pre", "--out", out)  # refused: no hold
    intact = (out / "manifest.json").read_bytes() == before and PolicyRuntime.load(out) is not None
    if not intact:
        return LOST, "the existing bundle changed"
    return (CLEAR, "refused; the old bundle is intact") if code == 2 else (SILENT, msg)


# ---------------------------------------------------------------------- safety filter
def obs(**kw):
    return {"state": np.linspace(-1, 1, 5, dtype=np.float32), "instruction": "open the drawer", **kw}


def held(o, needle) -> tuple[str, str]:
    s = Fix.runtime.session()
    s.act(obs())
    d = s.act(o)
    if d.status != "hold":
        return SILENT, f"status {d.status}"
    return (CLEAR, d.reasons[0][:110]) if any(needle in r for r in d.reasons) else (TRACE, str(d.reasons))


for _name, _o, _needle in [
    ("NaN state", {"state": np.full(5, np.nan, np.float32)}, "NaN"),
    ("state of the wrong shape", {"state": np.zeros(7, np.float32)}, "shape"),
    ("integer state", {"state": np.zeros(5, np.int64)}, "floating"),
    ("state null", {"state": None}, "lacks 'state'"),
    ("instruction not a string", {"instruction": 3}, "instruction"),
    ("instruction of 100k characters", {"instruction": "x" * 100_000}, "max_instruction_chars"),
    ("stale timestamp", {"timestamp": time.time() - 60}, "stale"),
    ("timestamp from the future", {"timestamp": time.time() + 60}, "future"),
    ("timestamp not a number", {"timestamp": "noon"}, "not a number"),
]:
    case("safety filter", _name)(lambda o=_o, n=_needle: held(obs(**o), n))


@case("safety filter", "delta control hold: arm stops, gripper kept")
def _():
    f = SafetyFilter(low=-1, high=1, hold=["zero", "zero", "zero", "last"])
    f.filter(np.array([0.5, 0.5, 0.5, 0.7]))
    a = f.hold("fault").action.tolist()
    return (OK, str(a)) if a == [0.0, 0.0, 0.0, np.float32(0.7)] else (SILENT, f"hold sends {a}")


@case("safety filter", "fault before any action (hold needs 'last')")
def _():
    d = SafetyFilter(low=-1, high=1, hold=["zero", "last"]).hold("fault")
    return (CLEAR, d.reasons[-1]) if d.action is None else (SILENT, f"sends {d.action}")


@case("safety filter", "policy outputs NaN")
def _():
    f = SafetyFilter(low=-1, high=1, hold="zero", dim=3)
    d = f.filter(np.array([np.nan, 0, 0]))
    return (CLEAR, d.reasons[0]) if d.status == "hold" and d.action.tolist() == [0, 0, 0] else (SILENT, str(d))


@case("safety filter", "constructor low > high")
def _():
    return expect_error(lambda: SafetyFilter(low=[1, 1], high=[0, 0]), "low <= high")


@case("safety filter", "hold value outside the bounds")
def _():
    return expect_error(lambda: SafetyFilter(low=-1, high=1, hold=[0, 5]), "hold[1]")


@case("safety filter", "unknown session safety override")
def _():
    return expect_error(lambda: Fix.runtime.session(safety={"hi": 3}), "unknown safety override")


@case("safety filter", "session override puts zero hold outside bounds")
def _():
    def edit(m):
        m["action"]["hold"] = ["zero", "zero", "last"]
        m["safety"]["action_low"] = [-3.0, -3.0, -3.0]
        m["safety"]["action_high"] = [3.0, 3.0, 3.0]
    rt = PolicyRuntime.load(edited(edit))
    return expect_error(lambda: rt.session(safety={"low": 0.5}), "hold[0]")


# ---------------------------------------------------------------------- server
def ws(url=None):
    import inspect

    from websockets.sync.client import connect
    kw = {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}
    return connect(url or Fix.server.url, max_size=None, **kw)


def drained(server, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while server.active_connections and time.monotonic() < deadline:
        time.sleep(0.02)


def close_code(conn, timeout=10):
    from websockets.exceptions import ConnectionClosed
    try:
        while True:
            conn.recv(timeout=timeout)
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd is not None else None
    except TimeoutError:
        return "still open"


def reply_code(data, hello=True):
    with PolicyClient(Fix.server.url, TOKEN) if hello else ws() as c:
        if hello:
            r = c.request_raw(data)
        else:
            c.send(data)
            r = unpack(c.recv(timeout=10))
    return r.get("code") if r.get("type") == "error" else r.get("status")


def want(got, expected, note=""):
    return (CLEAR, f"{got} {note}".strip()) if got == expected else (SILENT if got in ("ok", None) else TRACE, str(got))


@case("server", "wrong token")
def _():
    return expect_error(lambda: PolicyClient(Fix.server.url, "nope"), "unauthorized")


@case("server", "no token")
def _():
    return expect_error(lambda: PolicyClient(Fix.server.url), "unauthorized")


@case("server", "act before hello")
def _():
    return want(reply_code(pack({"type": "act", "observation": obs()}), hello=False), "not_ready")


@case("server", "1 MB message before hello")
def _():
    with ws() as c:
        c.send(pack({"type": "hello", "token": TOKEN, "pad": b"\0" * (1 << 20)}))
        return want(close_code(c), 1009, "(refused unread)")


@case("server", "connection that never says hello")
def _():
    with ws() as c:
        return want(close_code(c), 1008, f"(after {Fix.server.hello_timeout_s:g} s)")


@case("server", "connections over the cap")
def _():
    held = [ws() for _ in range(Fix.server.max_connections)]
    try:
        for _ in range(100):  # each takes its slot when its handler starts, just after the handshake
            if Fix.server.active_connections == Fix.server.max_connections:
                break
            time.sleep(0.05)
        extra = ws()
        return want(close_code(extra, timeout=5), 1013, "(try again later)")
    finally:
        for c in held:
            c.close()
        drained(Fix.server)


@case("server", "not msgpack")
def _():
    return want(reply_code(b"\xc1\xc1 junk"), "bad_message")


@case("server", "msgpack list instead of map")
def _():
    import msgpack
    return want(reply_code(msgpack.packb([1, 2])), "bad_message")


@case("server", "text frame")
def _():
    with PolicyClient(Fix.server.url, TOKEN) as c:
        c.ws.send("hello?")
        return want(unpack(c.ws.recv(timeout=10)).get("code"), "bad_message")


@case("server", "unknown request type")
def _():
    return want(reply_code(pack({"type": "dance"})), "unknown_type")


@case("server", "object-dtype array")
def _():
    import msgpack
    arr = {"__ndarray__": True, "dtype": "O", "shape": [1], "data": b"\0" * 8}
    return want(reply_code(msgpack.packb({"type": "act", "observation": {"state": arr}})), "bad_message")


@case("server", "array bytes do not match its shape")
def _():
    import msgpack
    arr = {"__ndarray__": True, "dtype": "<f4", "shape": [5], "data": b"\0" * 3}
    return want(reply_code(msgpack.packb({"type": "act", "observation": {"state": arr}})), "bad_message")


@case("server", "message over max_message_bytes")
def _():
    return want(reply_code(pack({"type": "act", "observation": obs(pad=np.zeros(3 << 20, np.uint8))})), "too_large")


@case("server", "1.5 MB instruction")
def _():
    return want(reply_code(pack({"type": "act", "observation": obs(instruction="w " * 750_000)})), "too_large")


@case("server", "bad session option")
def _():
    return expect_error(lambda: PolicyClient(Fix.server.url, TOKEN, session={"mode": "sideways"}), "bad_session")


@case("server", "unsupported protocol version")
def _():
    with ws() as c:
        c.send(pack({"type": "hello", "protocol": 99, "token": TOKEN}))
        return want(unpack(c.recv(timeout=10)).get("code"), "unsupported_protocol")


@case("server", "observation of the wrong shape")
def _():
    with PolicyClient(Fix.server.url, TOKEN) as c:
        r = c.act({"state": np.zeros(9, np.float32), "instruction": "x"})
    return (CLEAR, r["reasons"][0][:110]) if r["status"] == "hold" else (SILENT, r["status"])


@case("server", "client drops mid-request; next client served")
def _():
    c = ws()
    c.send(pack({"type": "hello", "token": TOKEN}))
    c.close()
    with PolicyClient(Fix.server.url, TOKEN) as good:
        return (OK, "server up") if good.act(obs())["status"] == "ok" else (SILENT, "no action")


@case("server", "port already in use")
def _():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        return expect_error(lambda: start_server_thread(Fix.runtime, port=busy.getsockname()[1]), "already in use")


@case("server", "port out of range")
def _():
    return expect_error(lambda: start_server_thread(Fix.runtime, port=70000), "0..65535")


@case("server", "hello timeout 0")
def _():
    return expect_error(lambda: start_server_thread(Fix.runtime, hello_timeout_s=0), "hello_timeout_s")


# ---------------------------------------------------------------------- main
def run_cases() -> list[tuple[str, str, str, str]]:
    rows = []
    for area, name, fn in CASES:
        drained(Fix.server)  # a refused request keeps its slot for its back-off; start each case alone
        try:
            outcome, note = fn()
        except Exception as e:  # the harness itself must not hide a crash
            outcome, note = TRACE, f"{type(e).__name__}: {e}"[:110]
        rows.append((area, name, outcome, note.replace("|", "/").replace("\n", " ")))
    return rows


def print_tables(rows) -> None:
    print("| area | input or fault | outcome | what happened |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    kinds = [CLEAR, OK, TRACE, SILENT, LOST]
    print("\n| area | cases | " + " | ".join(kinds) + " |\n|---|---|" + "---|" * len(kinds))
    areas = list(dict.fromkeys(r[0] for r in rows))
    for area in areas + ["total"]:
        sel = [r for r in rows if area in (r[0], "total")]
        c = Counter(r[2] for r in sel)
        print(f"| {area} | {len(sel)} | " + " | ".join(str(c[k]) for k in kinds) + " |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        Fix.tmp = Path(tmp)
        Fix.bundle = export_bundle(tiny_policy("ddim"), Fix.tmp / "bundle", hold="last")
        Fix.runtime = PolicyRuntime.load(Fix.bundle)
        Fix.server = start_server_thread(Fix.runtime, token=TOKEN, max_message_bytes=2 << 20, hello_timeout_s=1.0,
                                         max_connections=8)
        try:
            rows = run_cases()
        finally:
            Fix.server.stop()
        print_tables(rows)
        if not args.no_latency:
            s = summary(measure(Fix.runtime, requests=args.requests))
            print(f"\ngood client, {args.requests} acts: unloaded p50 {s['unloaded_p50_ms']:.2f} ms p99 "
                  f"{s['unloaded_p99_ms']:.2f} ms; with 100 idle connections + a 1.5 MB-instruction client: p50 "
                  f"{s['loaded_p50_ms']:.2f} ms p99 {s['loaded_p99_ms']:.2f} ms; p99 ratio {s['p99_ratio']:.2f} "
                  f"({s['bad_requests']} oversized requests answered)")


if __name__ == "__main__":
    main()
