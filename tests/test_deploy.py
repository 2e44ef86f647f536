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
                         action_bounds=([-1.5, 0.0, 0.5], [1.5, 3.0, 1.5]), hold="last")


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
    f = SafetyFilter(low=[-1, -1], high=[1, 1], max_delta=[0.1, 0.5], hold="last")  # absolute control
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


def test_delta_hold_stops_motion_and_keeps_the_gripper():
    """End-effector delta control: re-sending the last command on a fault would keep the arm moving."""
    f = SafetyFilter(low=-1, high=1, hold=["zero", "zero", "zero", "last"])
    d = f.hold("before any action")
    assert d.action is None and "keep the robot still" in d.reasons[-1]  # no gripper command known yet
    f.filter(np.array([0.5, -0.4, 0.3, 0.8]))
    d = f.hold("stale observation")
    np.testing.assert_array_equal(d.action, np.array([0.0, 0.0, 0.0, 0.8], np.float32))
    np.testing.assert_array_equal(f.hold("again").action, d.action)  # holding stays still
    assert SafetyFilter(low=-1, high=1, dim=4).hold("no hold declared").action is None
    with pytest.raises(ValueError, match=r"hold\[1\]='zero' must lie inside the bounds \[0.5, 1.5\]"):
        SafetyFilter(low=[-1, 0.5], high=[1, 1.5], hold="zero")
    with pytest.raises(ValueError, match="'zero', 'last' or a number"):
        SafetyFilter(low=-1, high=1, hold=["zero", "stop"])


def _edit_manifest(bundle, tmp_path, edit):
    """A copy of ``bundle`` whose manifest (not covered by the checksums) is changed by ``edit(manifest)``."""
    import json
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(bundle, out)
    m = json.loads((out / "manifest.json").read_text())
    edit(m)
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def _set(path, value):
    def edit(m):
        *keys, last = path.split(".")
        d = m
        for k in keys:
            d = d[k]
        if value is _DELETE:
            del d[last]
        else:
            d[last] = value
    return edit


_DELETE = object()


@pytest.mark.parametrize("path,value,match", [
    ("safety.action_low", [2.0, 0.0, 0.5], r"action_low\[0\]=2.0 > action_high\[0\]=1.5"),
    ("safety", _DELETE, "'safety' section"),
    ("safety", "none", r"safety must be a JSON object"),
    ("chunking.horizon", 0, r"chunking.horizon must be an integer >= 1, got 0"),
    ("chunking.horizon", "4", r"chunking.horizon must be an integer >= 1, got '4'"),
    ("chunking.exec_steps", 9, r"chunking.exec_steps must be in \[1, horizon=4\]"),
    ("chunking.control_hz", -10, r"chunking.control_hz must be > 0"),
    ("safety.action_high", "abc", r"safety.action_high must be a list of 3 finite numbers"),
    ("safety.action_high", [1, 2], r"safety.action_high must be a list of 3"),
    ("safety.action_low", [-1, None, 0.5], r"safety.action_low\[1\] must be a finite number"),
    ("safety.max_delta", [0.1, -1, 0.1], r"safety.max_delta must be > 0"),
    ("safety.watchdog_timeout_s", "soon", r"safety.watchdog_timeout_s must be a finite number"),
    ("safety.require_timestamp", "yes", r"safety.require_timestamp must be true or false"),
    ("action.hold", ["last", "stop", "last"], r"action.hold\[1\] must be one of \['zero', 'last'\]"),
    ("action.hold", ["zero", "zero", "zero"], r"action.hold\[2\]='zero' lies outside the safety bounds \[0.5, 1.5\]"),
    ("action.hold", "last", r"action.hold must be a list of 3 entries"),
    ("action.hold", _DELETE, r"action.hold is missing.*Re-export"),  # a bundle from before the declared hold
    ("action.dim", True, r"action.dim must be an integer"),
])
def test_inconsistent_manifest_fails_at_load_naming_the_field(bundle, tmp_path, path, value, match):
    from vla_rl.deploy import BundleError

    with pytest.raises(BundleError, match=match):
        PolicyRuntime.load(_edit_manifest(bundle, tmp_path, _set(path, value)))


def test_old_bundle_with_an_explicit_hold_action_still_loads(bundle, tmp_path):
    def edit(m):
        del m["action"]["hold"]
        m["safety"]["hold_action"] = [0.0, 1.0, 1.0]

    s = PolicyRuntime.load(_edit_manifest(bundle, tmp_path, edit)).session()
    s.act(obs())
    np.testing.assert_array_equal(s.act(obs(state=None)).action, [0.0, 1.0, 1.0])
