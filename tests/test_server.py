"""The policy server over a real loopback websocket: round trip, errors, auth, concurrent clients."""

import threading

import msgpack
import numpy as np
import pytest
from websockets.sync.client import connect

from test_export import tiny_policy
from vla_rl.deploy import PolicyRuntime
from vla_rl.deploy.protocol import pack, unpack
from vla_rl.deploy.server import PolicyClient, PolicyServerError, start_server_thread
from vla_rl.export import export_bundle

TOKEN = "let-me-in"


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    bundle = export_bundle(tiny_policy("flow"), tmp_path_factory.mktemp("server") / "bundle", hold="last", max_delta=10.0)
    return PolicyRuntime.load(bundle)


@pytest.fixture(scope="module")
def server(runtime):
    srv = start_server_thread(runtime, port=0, token=TOKEN, max_message_bytes=64 * 1024)
    yield srv
    srv.stop()


def obs(i=0):
    return {"state": np.linspace(-1, 1, 5, dtype=np.float32) * (i + 1), "instruction": "open the drawer"}


def test_round_trip_matches_local_runtime(server, runtime):
    assert server.host == "127.0.0.1" and server.port > 0
    local = runtime.session(seed=5)
    with PolicyClient(server.url, TOKEN, session={"seed": 5}) as client:
        assert client.server_info["protocol"] == 1
        assert client.metadata["action"]["dim"] == 3 and "checksums" not in client.metadata
        assert client.get_metadata()["chunking"]["exec_steps"] == 2
        for i in range(5):
            reply = client.act(obs(i))
            expected = local.act(obs(i))
            assert reply["type"] == "action" and reply["status"] == "ok"
            assert reply["action"].dtype == np.float32
            np.testing.assert_array_equal(reply["action"], expected.action)
            assert reply["replanned"] == expected.replanned and reply["step"] == i
        client.reset()
        local.reset()
        np.testing.assert_array_equal(client.act(obs(0))["action"], local.act(obs(0)).action)
        bad = client.act({"state": np.zeros(7, np.float32), "instruction": "x"})  # out of spec -> hold, not error
        assert bad["status"] == "hold" and "shape" in bad["reasons"][0]


def test_malformed_and_oversized_messages_get_errors_and_server_stays_up(server):
    with PolicyClient(server.url, TOKEN) as client:
        assert client.request_raw(b"\xc1\xc1 not msgpack")["code"] == "bad_message"
        assert client.request_raw(msgpack.packb([1, 2, 3]))["code"] == "bad_message"
        assert client.request_raw(pack({"type": "dance"}))["code"] == "unknown_type"
        bad_array = {"type": "act", "observation": {"state": {"__ndarray__": True, "dtype": "<f4", "shape": [5],
                                                              "data": b"\x00" * 3}, "instruction": "x"}}
        assert client.request_raw(msgpack.packb(bad_array))["code"] == "bad_message"
        obj_array = {"__ndarray__": True, "dtype": "O", "shape": [1], "data": b"\x00" * 8}
        assert client.request_raw(msgpack.packb({"type": "act", "observation": {"state": obj_array}}))["code"] == "bad_message"
        big = pack({"type": "act", "observation": {**obs(), "rgb": np.zeros(100_000, np.uint8)}})
        reply = client.request_raw(big)
        assert reply["code"] == "too_large" and "max_message_bytes" in reply["message"]
        with pytest.raises(PolicyServerError, match="bad_session"):
            client.request({"type": "hello", "token": TOKEN, "session": {"mode": "sideways"}})
        assert client.act(obs())["status"] == "ok"  # same connection still works
    with PolicyClient(server.url, TOKEN) as client:  # and so do new ones
        assert client.act(obs())["status"] == "ok"


def test_auth_and_handshake_order(server):
    with pytest.raises(PolicyServerError, match="unauthorized"):
        PolicyClient(server.url, "wrong")
    with pytest.raises(PolicyServerError, match="unauthorized"):
        PolicyClient(server.url)
    with connect(server.url) as ws:  # a request before hello is refused
        ws.send(pack({"type": "act", "observation": obs()}))
        assert unpack(ws.recv(timeout=5))["code"] == "not_ready"
        ws.send(pack({"type": "hello", "protocol": 99, "token": TOKEN}))
        assert unpack(ws.recv(timeout=5))["code"] == "unsupported_protocol"
    with PolicyClient(server.url, TOKEN) as client:
        assert client.act(obs())["status"] == "ok"


def test_two_concurrent_clients_have_their_own_sessions(server, runtime):
    n_steps = 8
    expected = {}
    for seed in (1, 2):
        s = runtime.session(seed=seed)
        expected[seed] = [s.act(obs(i)).action for i in range(n_steps)]
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def run(seed):
        try:
            with PolicyClient(server.url, TOKEN, session={"seed": seed}) as client:
                barrier.wait(timeout=10)
                results[seed] = [client.act(obs(i))["action"] for i in range(n_steps)]
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    for seed in (1, 2):
        np.testing.assert_array_equal(np.stack(results[seed]), np.stack(expected[seed]))
    assert not np.allclose(results[1][0], results[2][0])


def test_server_without_token_binds_loopback(runtime):
    srv = start_server_thread(runtime)
    try:
        assert srv.host == "127.0.0.1"
        with PolicyClient(srv.url) as client:
            assert client.act(obs())["status"] == "ok"
    finally:
        srv.stop()


def test_serve_command_in_subprocess_without_torch_token_from_env(runtime):
    import os
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; from vla_rl.deploy.server import main; "
            "main(sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", code, str(runtime.bundle_dir), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "VLA_RL_SERVE_TOKEN": "t0k"})
    try:
        line = proc.stdout.readline()
        assert "ws://127.0.0.1:" in line and "token required" in line, (
            line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" on ")[1].split()[0]
        with PolicyClient(url, "t0k") as client:
            assert client.act(obs())["status"] == "ok"
        with pytest.raises(PolicyServerError, match="unauthorized"):
            PolicyClient(url)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_serve_port_in_use_or_out_of_range_is_a_clear_error(runtime, capsys):
    import socket

    from vla_rl.cli import main as cli_main
    from vla_rl.deploy.server import main as serve_module_main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            serve_module_main([str(runtime.bundle_dir), "--port", str(port), "--token", "on-the-command-line"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"port {port} on 127.0.0.1 is already in use" in err and "--port" in err
        assert "VLA_RL_SERVE_TOKEN" in err and "ps" in err  # the command-line token warning
    for bad in ("70000", "-1"):
        assert cli_main(["serve", str(runtime.bundle_dir), "--port", bad]) == 2
        assert "port must be an integer in 0..65535" in capsys.readouterr().err
    assert cli_main(["serve", str(runtime.bundle_dir), "--max-connections", "0"]) == 2
    assert "max_connections must be an integer >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------- one client cannot stall or exhaust the server
def _closed_with(ws, timeout=10):
    """The close code the server ended ``ws`` with (after draining any replies)."""
    from websockets.exceptions import ConnectionClosed

    try:
        while True:
            ws.recv(timeout=timeout)
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd is not None else None


def _open(url):
    """A raw websocket that stays open outside a ``with`` block (websockets >= 17 wants legacy=True for that)."""
    import inspect

    return connect(url, **({"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}))


def test_client_and_server_importable_from_vla_rl_deploy():
    import vla_rl.deploy as deploy

    assert deploy.PolicyClient is PolicyClient and deploy.start_server_thread is start_server_thread


def test_hello_must_arrive_in_time_and_be_small(runtime):
    import time

    srv = start_server_thread(runtime, token=TOKEN, hello_timeout_s=0.5, max_hello_bytes=4096)
    try:
        with connect(srv.url) as idle:  # says nothing: closed once the hello timeout passes
            t0 = time.monotonic()
            assert _closed_with(idle) == 1008 and time.monotonic() - t0 < 5
        with connect(srv.url, max_size=None) as big:  # 1 MB before the token: refused unread (1009)
            big.send(pack({"type": "act", "observation": obs(), "pad": b"\0" * (1 << 20)}))
            assert _closed_with(big) == 1009
        with PolicyClient(srv.url, TOKEN) as client:  # after hello, a 200 KB message is fine (camera-less policy)
            assert client.act({**obs(), "extra": np.zeros(200_000, np.uint8)})["status"] == "ok"
    finally:
        srv.stop()


def test_connection_cap(runtime):
    import time

    srv = start_server_thread(runtime, token=TOKEN, max_connections=3, hello_timeout_s=30)
    try:
        first = PolicyClient(srv.url, TOKEN)
        idle = [_open(srv.url) for _ in range(2)]
        for _ in range(100):  # the server takes a slot when its handler starts, just after the handshake
            if srv.active_connections == 3:
                break
            time.sleep(0.05)
        with connect(srv.url) as extra:  # one too many: closed at once, "try again later"
            assert _closed_with(extra) == 1013
        assert first.act(obs())["status"] == "ok"  # those admitted are served
        idle.pop().close()
        for _ in range(50):  # the slot frees when the server sees the close
            try:
                with PolicyClient(srv.url, TOKEN) as again:
                    assert again.act(obs())["status"] == "ok"
                break
            except Exception:
                time.sleep(0.1)
        else:
            raise AssertionError("a freed connection slot was not reused")
        first.close()
        for ws in idle:
            ws.close()
    finally:
        srv.stop()


def test_oversized_instruction_is_refused_before_tokenizing(server, runtime):
    with PolicyClient(server.url, TOKEN) as client:
        with pytest.raises(PolicyServerError, match="too_large.*max_instruction_chars=1024"):
            client.act({**obs(), "instruction": "pick up the cube " * 500})
        assert client.act(obs())["status"] == "ok"
    local = runtime.session().act({**obs(), "instruction": "x" * 5000})  # the in-process runtime holds
    assert local.status == "hold" and "max_instruction_chars" in local.reasons[0]


def test_instruction_cache_is_bounded_in_bytes():
    from vla_rl.deploy.language import CachedLanguage, HashLanguage

    enc = HashLanguage(np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32), 64)
    cache = CachedLanguage(enc, max_entries=10_000, max_bytes=20_000)
    for i in range(200):
        cache([f"instruction {i} " + "w" * 500])
        assert cache.nbytes <= 20_000
    assert 0 < len(cache._cache) < 200
    np.testing.assert_array_equal(cache(["instruction 199 " + "w" * 500]), enc(["instruction 199 " + "w" * 500]))


def _timed_acts(client, n):
    import time

    out = []
    for i in range(n):
        t0 = time.perf_counter()
        client.act(obs(i % 3))
        out.append(time.perf_counter() - t0)
    return np.array(out)


FLOOD = """
import os, sys, time
import numpy as np
from vla_rl.deploy.protocol import pack
from vla_rl.deploy.server import PolicyClient
url, token, pause = sys.argv[1:4]
text = "pick up the red cube " * 75_000  # ~1.5 MB
with PolicyClient(url, token, timeout=60) as bad:
    print("ready", flush=True)
    for n in range(10**9):  # ever new text (no cache hit), as fast as replies come
        if os.path.exists(pause):  # paused only once the last request was answered
            print("paused", flush=True)
            while os.path.exists(pause):
                time.sleep(0.005)
        bad.request_raw(pack({"type": "act", "observation": {"state": np.zeros(5, np.float32), "instruction": f"{n} {text}"}}))
        print(n + 1, flush=True)
"""


def _pause(flood, flag) -> int:
    """Pause the flooding client once its last request is answered; how many were answered meanwhile."""
    flag.touch()
    answered = 0
    while (line := flood.stdout.readline().strip()) != "paused":
        assert line, "the oversized client died"
        answered += line.isdigit()
    return answered


def test_idle_connections_and_an_oversized_client_do_not_stall_a_good_client(runtime, tmp_path):
    """100 connections that never say hello + one authenticated client (its own process, as a remote one
    would be) sending ever new 1.5 MB instructions; server defaults otherwise (8 MB messages). Blocks of
    the good client's requests alternate between the flood paused and running, so the drifting
    load of other processes falls on both (paused: after the server answered its last request). Before the limits each such instruction was tokenized under
    the shared lock (~0.3 s) and the good client's p99 grew ~150x (BENCHMARKS.md, bench_server.py).
    Allowed: 2x the unloaded p99 + 3 ms, as one p99 over 300 requests on a shared 2-core machine jitters
    by a few ms on its own."""
    import os
    import subprocess
    import sys
    import time

    t_start = time.monotonic()
    srv = start_server_thread(runtime, token=TOKEN, max_connections=110, hello_timeout_s=60)
    idle, flood, unloaded, loaded, answered = [], None, [], [], 0
    try:
        with PolicyClient(srv.url, TOKEN) as good:
            _timed_acts(good, 30)  # warm-up
            idle = [_open(srv.url) for _ in range(100)]
            flag = tmp_path / "pause"
            flood = subprocess.Popen([sys.executable, "-c", FLOOD, srv.url, TOKEN, str(flag)], stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
            assert flood.stdout.readline().strip() == "ready"
            for _ in range(6):
                answered += _pause(flood, flag)
                unloaded.append(_timed_acts(good, 50))
                flag.unlink()
                time.sleep(0.05)
                loaded.append(_timed_acts(good, 50))
            flood.kill()
            answered += sum(w.isdigit() for w in flood.communicate(timeout=30)[0].split())
    finally:
        if flood is not None and flood.poll() is None:
            flood.kill()
        for ws in idle:
            ws.close()
        srv.stop()
    unloaded_p99, loaded_p99 = np.percentile(np.concatenate(unloaded), 99), np.percentile(np.concatenate(loaded), 99)
    assert answered >= 3, f"the oversized client got only {answered} replies"
    assert loaded_p99 <= 2 * unloaded_p99 + 0.003, (loaded_p99, unloaded_p99, answered[-1])
    assert time.monotonic() - t_start < 30
