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


def test_serve_command_in_subprocess_without_torch(runtime):
    import os
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; from vla_rl.deploy.server import main; "
            "main(sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", code, str(runtime.bundle_dir), "--port", "0", "--token", "t0k"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        line = proc.stdout.readline()
        assert "ws://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" on ")[1].split()[0]
        with PolicyClient(url, "t0k") as client:
            assert client.act(obs())["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
