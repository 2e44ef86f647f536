"""Demo format round trip, config validation and the `vla-rl pretrain` command end to end."""

import numpy as np
import pytest
import torch

from vla_rl.cli import main
from vla_rl.config import ConfigError, load_config
from vla_rl.data import DataError, DemoDataset, EpisodeWriter, load_episodes
from vla_rl.pretrain import PretrainConfig
from vla_rl.policy import VLAPolicy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def write_demos(path, n=6, rgb=False, seed=0):
    rng = np.random.default_rng(seed)
    with EpisodeWriter(path) as w:
        for i in range(n):
            t = 5 + i
            obs = {"state": rng.normal(size=(t, 4)), "privileged": rng.normal(size=(t, 2))}
            if rgb:
                obs["rgb"] = rng.integers(0, 255, size=(t, 1, 3, 16, 16), dtype=np.uint8)
            w.add_episode(obs, rng.normal(size=(t, 2)), instruction=f"task {i % 2}", success=i != 3)
    return path


def test_demo_round_trip_and_chunk_padding(tmp_path):
    write_demos(tmp_path / "d", rgb=True)
    eps = load_episodes(tmp_path / "d")
    assert len(eps) == 6 and eps[3]["success"] is False and eps[0]["rgb"].dtype == np.uint8
    assert len(load_episodes(tmp_path / "d", only_success=True)) == 5
    ds = DemoDataset(eps, horizon=4)
    last = ds[len(eps[0]["action"]) - 1]  # last step of episode 0: 1 real action, 3 padded
    assert last["action_mask"].tolist() == [True, False, False, False]
    assert torch.equal(last["action"][1], last["action"][0])  # padding repeats the last action
    assert last["rgb"].shape == (1, 3, 16, 16)


def test_demo_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_episodes(tmp_path / "missing")
    (tmp_path / "bad.hdf5").write_bytes(b"nope")
    with pytest.raises(DataError, match="cannot read"):
        load_episodes(tmp_path / "bad.hdf5")
    w = EpisodeWriter(tmp_path / "x")
    with pytest.raises(DataError, match="NaN"):
        w.add_episode({"state": np.zeros((2, 3))}, np.full((2, 2), np.nan), "i", True)
    w.close()


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="bogus"):
        load_config(PretrainConfig, [], ["bogus=1"])
    with pytest.raises(ConfigError, match="horizon"):
        load_config(PretrainConfig, [], ["policy.horizon=many"])
    (tmp_path / "a.yaml").write_text("steps: 5\npolicy:\n  horizonn: 3\n")
    with pytest.raises(ConfigError, match="horizonn"):
        load_config(PretrainConfig, [tmp_path / "a.yaml"])
    (tmp_path / "base.yaml").write_text("steps: 7\nlr: 0.1\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nlr: 0.2\n")
    cfg = load_config(PretrainConfig, [tmp_path / "child.yaml"], ["batch_size=3"])
    assert (cfg.steps, cfg.lr, cfg.batch_size) == (7, 0.2, 3)


def test_pretrain_cli_end_to_end(tmp_path):
    write_demos(tmp_path / "demos", rgb=True)
    out = tmp_path / "ckpt"
    rc = main(["pretrain", "--data", str(tmp_path / "demos"), "--out", str(out), "steps=12", "batch_size=8",
               "save_every=5", "log_every=4", "policy.horizon=4", "policy.exec_steps=2", "policy.cameras=[front]",
               "policy.language_encoder=hash", "policy.dit.d_model=32", "policy.dit.n_heads=4", "progress=false"])
    assert rc == 0
    policy = VLAPolicy.from_pretrained(out)
    assert (policy.cfg.action_dim, policy.cfg.state_dim, policy.cfg.privileged_dim) == (2, 4, 2)
    assert policy.cfg.image_size == [16, 16]
    # normalization fitted on the data: every demo action maps inside [-1, 1]
    acts = torch.from_numpy(np.concatenate([e["action"] for e in load_episodes(tmp_path / "demos", True)]))
    norm = policy.normalizer.normalize_action(acts)
    assert norm.min() >= -1 - 1e-5 and norm.max() <= 1 + 1e-5 and norm.min() < -0.99
    events = EventAccumulator(str(tmp_path / "ckpt_tb")).Reload()
    assert {"pretrain/bc_loss", "pretrain/grad_norm"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("pretrain/bc_loss")] == [4, 8, 12]


def test_pretrain_cli_reports_bad_config(tmp_path, capsys):
    assert main(["pretrain", "--data", str(tmp_path), "stepz=3"]) == 2
    assert "stepz" in capsys.readouterr().err


def test_lr_schedule_warms_up_then_decays_to_zero():
    from vla_rl.pretrain import lr_factor

    cos = lr_factor(PretrainConfig(steps=1100, warmup_steps=100, lr_schedule="cosine"))
    assert cos(0) == pytest.approx(0.01) and cos(99) == pytest.approx(1.0)
    assert cos(100) == pytest.approx(1.0) and cos(600) == pytest.approx(0.5) and cos(1100) == pytest.approx(0.0)
    assert all(cos(s) >= cos(s + 1) for s in range(100, 1100))
    const = lr_factor(PretrainConfig(steps=1100, warmup_steps=100, lr_schedule="constant"))
    assert const(50) == pytest.approx(0.51) and const(1099) == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(PretrainConfig(lr_schedule="linear"))


def test_stacked_tensors_match_per_sample_items(tmp_path):
    """DemoDataset.tensors() (what pretrain batches from) holds exactly the samples __getitem__ gives."""
    rng = np.random.default_rng(0)
    eps = [{"action": rng.normal(size=(n, 2)).astype(np.float32), "state": rng.normal(size=(n, 3)).astype(np.float32),
            "privileged": rng.normal(size=(n, 1)).astype(np.float32), "instruction": f"task {n}"} for n in (3, 7, 1)]
    ds = DemoDataset(eps, horizon=4)
    t = ds.tensors()
    assert len(t["instruction"]) == len(ds) == 11
    for i in range(len(ds)):
        s = ds[i]
        for k in ("state", "action", "action_mask", "privileged"):
            assert torch.equal(t[k][i], s[k]), (i, k)
        assert t["instruction"][i] == s["instruction"]
