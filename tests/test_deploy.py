"""The torch-free runtime: action queue, temporal ensembling, safety filter, watchdog, import without torch."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from test_export import tiny_policy
from vla_rl.deploy import PolicyRuntime, SafetyFilter
from vla_rl.export import export_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return export_bundle(tiny_policy("ddim", ("front",)), tmp_path_factory.mktemp("deploy") / "bundle",
                         action_bounds=([-1.5, 0.0, 0.5], [1.5, 3.0, 1.5]))


@pytest.fixture(scope="module")
def runtime(bundle):
    return PolicyRuntime.load(bundle)


def obs(seed=0, **kw):
    rng = np.random.default_rng(seed)
    o = {"state": rng.standard_normal(5).astype(np.float32),
         "rgb": rng.integers(0, 256, (1, 3, 16, 16), dtype=np.uint8), "instruction": "pick up the red cube"}
    o.update(kw)
    return o


def test_action_queue_executes_exec_steps_then_replans(runtime):
    s = runtime.session(seed=7, safety={"low": -100, "high": 100})
    o = obs()
    noise_rng = np.random.default_rng(7)
    decisions = [s.act(o) for _ in range(5)]
    assert [d.replanned for d in decisions] == [True, False, True, False, True]
    assert [d.step for d in decisions] == [0, 1, 2, 3, 4]
    assert all(d.ok and d.action.shape == (3,) and d.action.dtype == np.float32 for d in decisions)
    for first in (0, 2):
        chunk = runtime.predict_chunk(o["state"][None], [o["instruction"]], o["rgb"][None],
                                      noise_rng.standard_normal(runtime.noise_shape(1), dtype=np.float32))[0]
        np.testing.assert_allclose(decisions[first].action, chunk[0], atol=1e-6)
        np.testing.assert_allclose(decisions[first + 1].action, chunk[1], atol=1e-6)
    s.reset()  # same seed -> same actions again
    np.testing.assert_allclose(s.act(o).action, decisions[0].action)


def test_batch_of_one_observation_is_accepted(runtime):
    o = obs()
    a = runtime.session(seed=4).act(o).action
    batched = {"state": o["state"][None].astype(np.float64), "rgb": o["rgb"][None], "instruction": [o["instruction"]]}
    np.testing.assert_allclose(runtime.session(seed=4).act(batched).action, a, atol=1e-6)


def test_zero_noise_is_reproducible_across_sessions(runtime):
    a = [runtime.session(noise="zeros", seed=s).act(obs()).action for s in (1, 2)]
    np.testing.assert_array_equal(a[0], a[1])


def test_temporal_ensembling_weights_oldest_first(runtime):
    m = 0.5
    s = runtime.session(mode="ensemble", ensemble_decay=m, seed=3, safety={"low": -100, "high": 100})
    o = obs()
    rng = np.random.default_rng(3)
    chunks = []
    for t in range(6):
        d = s.act(o)
        chunks.append(runtime.predict_chunk(o["state"][None], [o["instruction"]], o["rgb"][None],
                                            rng.standard_normal(runtime.noise_shape(1), dtype=np.float32))[0])
        live = [(i, c) for i, c in enumerate(chunks) if t - i < runtime.horizon]
        w = np.exp(-m * np.arange(len(live)))
        expected = sum(wi * c[t - i] for wi, (i, c) in zip(w, live)) / w.sum()
        assert d.replanned
        np.testing.assert_allclose(d.action, expected, atol=1e-5)


def test_safety_clamp_and_rate_limit():
    f = SafetyFilter(low=[-1, -1], high=[1, 1], max_delta=[0.1, 0.5])
    d = f.filter(np.array([2.0, -0.5]))
    assert d.ok and d.clamped and not d.rate_limited
    np.testing.assert_allclose(d.action, [1.0, -0.5])
    d = f.filter(np.array([0.0, 0.5]))
    assert d.rate_limited and "max_delta" in d.reasons[0]
    np.testing.assert_allclose(d.action, [0.9, 0.0])
    d = f.filter(np.array([0.85, 0.2]))
    assert d.ok and not d.rate_limited and not d.clamped
    np.testing.assert_allclose(d.action, [0.85, 0.2])
    d = f.filter(np.array([np.nan, 0.0]))  # non-finite policy output -> hold
    assert d.status == "hold"
    np.testing.assert_allclose(d.action, [0.85, 0.2])


def test_safety_hold_action_and_no_action_yet():
    f = SafetyFilter(low=-1, high=1, dim=2)
    d = f.hold("sensor fault")
    assert d.status == "hold" and d.action is None and "sensor fault" in d.reasons
    f = SafetyFilter(low=-1, high=1, hold_action=[0.0, 5.0])
    f.filter(np.array([0.5, 0.5]))
    d = f.hold("sensor fault")
    np.testing.assert_allclose(d.action, [0.0, 1.0])  # the configured hold action (clamped), not the last command
    with pytest.raises(ValueError, match="max_delta"):
        SafetyFilter(low=[-1, -1], high=[1, 1], max_delta=[0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="dim"):
        SafetyFilter(low=-1, high=1)


@pytest.mark.parametrize("bad,reason", [
    ({"state": np.full(5, np.nan, np.float32)}, "NaN"),
    ({"state": np.zeros(4, np.float32)}, "shape"),
    ({"state": np.zeros(5, np.int64)}, "floating"),
    ({"rgb": np.zeros((1, 3, 16, 16), np.float32)}, "uint8"),
    ({"rgb": np.zeros((2, 3, 16, 16), np.uint8)}, "shape"),
    ({"instruction": 3}, "instruction"),
    ({"state": None}, "state"),
])
def test_bad_observation_holds_last_safe_action(runtime, bad, reason):
    s = runtime.session(seed=0)
    first = s.act(obs())
    d = s.act(obs(**bad))
    assert d.status == "hold" and any(reason in r for r in d.reasons), d.reasons
    np.testing.assert_array_equal(d.action, first.action)
    missing = obs()
    del missing["rgb"]
    assert s.act(missing).status == "hold"
    assert s.act(obs()).replanned  # a fault drops the old plan


def test_stale_observation_watchdog(runtime):
    now = [1000.0]
    s = runtime.session(safety={"clock": lambda: now[0], "watchdog_timeout_s": 0.2})
    assert s.act(obs(timestamp=999.9)).ok
    d = s.act(obs(timestamp=999.5))
    assert d.status == "hold" and "stale" in d.reasons[0]
    assert s.act(obs(timestamp="yesterday")).status == "hold"
    now[0] = 1000.05
    assert s.act(obs(timestamp=1000.0)).ok
    assert s.act(obs(timestamp=1001.0)).status == "hold"  # from the future: clocks out of sync
    assert runtime.session().act(obs()).ok  # no timestamp: the watchdog cannot judge ...
    strict = runtime.session(safety={"require_timestamp": True})
    d = strict.act(obs())  # ... unless timestamps are required
    assert d.status == "hold" and "timestamp" in d.reasons[0]


def test_runtime_imports_and_acts_without_torch(bundle):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import numpy as np
        from vla_rl.deploy import PolicyRuntime
        from vla_rl.deploy.server import PolicyClient, start_server_thread
        rt = PolicyRuntime.load({str(bundle)!r})
        d = rt.act({{"state": np.zeros(5, np.float32), "rgb": np.zeros((1, 3, 16, 16), np.uint8),
                    "instruction": "pick"}})
        assert d.ok and d.action.shape == (3,), d
        srv = start_server_thread(rt)
        with PolicyClient(srv.url) as c:
            assert c.act({{"state": np.zeros(5, np.float32), "rgb": np.zeros((1, 3, 16, 16), np.uint8),
                          "instruction": "pick"}})["status"] == "ok"
        srv.stop()
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m] is not None)
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
