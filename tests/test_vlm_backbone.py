"""The transformers VLM backbone (issue 16): tiny random models of real architectures (Qwen2-VL, PaliGemma)
built from their configs, saved to disk and loaded as a user's checkpoint is; features once per observation;
LoRA leaves base weights bit-identical; save/load bit-exact; BC and DPPO/RWR/DSRL on `place` with cameras;
export refused with the reason, and the torch policy served through a real socket instead."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")
pytest.importorskip("peft")

from vla_rl.checkpoint import CheckpointError  # noqa: E402
from vla_rl.policy import VLAPolicy  # noqa: E402
from vla_rl.policy.config import DiTConfig, NoiseConfig, PolicyConfig  # noqa: E402
from vla_rl.policy.vlm_backbone import VLMConfig, build_tiny_vlm  # noqa: E402

torch.set_num_threads(1)
IMG = 32


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_tiny_vlm("qwen2_vl", tmp_path_factory.mktemp("qwen") / "tiny-qwen2-vl", image_size=IMG)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return build_tiny_vlm("paligemma", tmp_path_factory.mktemp("pali") / "tiny-paligemma", image_size=IMG)


def vlm_cfg(path, mode="frozen", cameras=("front",), state_dim=4, action_dim=4, **vlm) -> PolicyConfig:
    return PolicyConfig(action_dim=action_dim, state_dim=state_dim, horizon=4, exec_steps=2, cameras=list(cameras),
                        image_size=[IMG, IMG], language_encoder="hash", language_dim=16, fusion_layers=0,
                        backbone="transformers", vlm=VLMConfig(path=str(path), mode=mode, tokens=4, lora_r=4, **vlm),
                        dit=DiTConfig(d_model=32, n_layers=1, n_heads=4), critic_hidden=[32],
                        noise=NoiseConfig(kind="flow", sample_steps=10, stochastic_steps=4))


def obs_batch(b=3, cams=1, seed=0, state_dim=4):
    g = torch.Generator().manual_seed(seed)
    return {"state": torch.randn(b, state_dim, generator=g),
            "rgb": torch.randint(0, 256, (b, cams, 3, IMG, IMG), generator=g, dtype=torch.uint8),
            "instruction": ["put the red cube in the blue box", "open", "move the cylinder left"][:b]}


class CountForward:
    """Counts real forward passes of the transformers model (a forward hook on the HF module)."""

    def __init__(self, policy):
        self.n = 0
        policy.vlm.model.register_forward_hook(lambda *a: setattr(self, "n", self.n + 1))


@pytest.mark.parametrize("family", ["qwen2_vl", "paligemma"])
def test_tiny_vlm_loads_from_its_directory_and_prints_counts(family, qwen_dir, gemma_dir, capsys):
    path = qwen_dir if family == "qwen2_vl" else gemma_dir
    torch.manual_seed(0)
    policy = VLAPolicy(vlm_cfg(path, "lora", cameras=("front", "wrist")))
    out = capsys.readouterr().out
    counts = policy.print_parameter_counts()
    assert policy.vlm.model_type == family and "trainable" in out and str(path) in out
    assert 0 < counts["trainable"] < counts["total"] and counts["vlm_trainable"] > 0
    assert f"{counts['trainable']:,} trainable" in out
    assert policy.cfg.vlm.revision.startswith("sha256:")
    obs = obs_batch(2, cams=2)
    chain = policy.sample(obs)
    assert chain.actions.shape == (2, 4, 4) and torch.isfinite(chain.actions).all()
    cond = policy.encode(obs)
    assert cond.shape == (2, 1 + 4, 32)
    # the instruction reaches the features: a different instruction, same pixels, different tokens
    other = dict(obs, instruction=["open the drawer", "open the drawer"])
    assert not torch.allclose(policy.encode(other), cond)


@pytest.mark.parametrize("steps,cache", [(10, 4096), (10, 0), (30, 0)])
def test_vlm_runs_once_per_observation_not_per_denoising_step(qwen_dir, steps, cache):
    torch.manual_seed(0)
    cfg = vlm_cfg(qwen_dir, "frozen", feature_cache=cache)
    cfg.noise.sample_steps = steps
    policy = VLAPolicy(cfg)
    calls = CountForward(policy)
    obs = obs_batch(3)
    assert policy.noise.num_steps == steps and len(policy.stochastic_indices) == 4
    with torch.no_grad():
        chain = policy.sample(obs)
    assert calls.n == 1  # K denoising steps, one VLM pass
    lp = policy.log_prob(obs, chain)  # K' = 4 likelihoods
    assert lp.shape == (3, 4)
    for _ in range(3):  # the update's epochs / minibatches evaluate the same observations again
        policy.log_prob({k: (v[[2, 0]] if k != "instruction" else [v[2], v[0]]) for k, v in obs.items()},
                        chain[[2, 0]])
    # cached: the rollout's pass is the only one; uncached: one pass per log_prob call (never per step)
    assert calls.n == (1 if cache else 1 + 1 + 3)
    # the cached features are the ones computed: the same log-likelihoods with and without the cache
    policy.cfg.vlm.feature_cache = 0
    torch.testing.assert_close(policy.log_prob(obs, chain), lp, rtol=0, atol=1e-5)


def test_a_full_cache_warns_and_recomputes(qwen_dir, caplog):
    torch.manual_seed(0)
    policy = VLAPolicy(vlm_cfg(qwen_dir, "frozen", feature_cache=2))
    calls = CountForward(policy)
    obs = obs_batch(3)
    with torch.no_grad():
        a = policy.encode(obs)
        b = policy.encode(obs)  # 3 observations, room for 2: the first was dropped and is recomputed
    assert calls.n == 2 and "feature_cache=2 observations is full" in caplog.text
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_cache_is_dropped_when_the_vlm_weights_change(qwen_dir):
    torch.manual_seed(0)
    policy = VLAPolicy(vlm_cfg(qwen_dir, "full"))
    calls = CountForward(policy)
    obs = obs_batch(2)
    with torch.no_grad():
        a = policy.encode(obs)
        policy.encode(obs)
        assert calls.n == 1
        next(policy.vlm.model.parameters()).add_(0.5)  # an optimizer step changes the weights in place
        b = policy.encode(obs)
    assert calls.n == 2 and not torch.allclose(a, b)
    policy.encode(obs)  # grad enabled and the VLM trainable (full): features must carry gradients
    assert calls.n == 3


def test_lora_update_changes_only_adapters(qwen_dir):
    torch.manual_seed(0)
    policy = VLAPolicy(vlm_cfg(qwen_dir, "lora"))
    base = {n: p.detach().clone() for n, p in policy.vlm.model.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in policy.vlm.model.named_parameters() if "lora_" in n}
    assert base and lora and all(not p.requires_grad for n, p in policy.vlm.model.named_parameters() if n in base)
    params = policy.actor_parameters()
    assert not {id(p) for n, p in policy.vlm.model.named_parameters() if n in base} & {id(p) for p in params}
    opt = torch.optim.Adam(params, lr=1e-2)
    obs = obs_batch(3)
    for _ in range(3):
        loss = policy.bc_loss(obs, torch.rand(3, 4, 4) * 2 - 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    now = dict(policy.vlm.model.named_parameters())
    for n, p in base.items():
        assert torch.equal(now[n], p), n  # bit-identical
    # every adapter's B (zero at init, so the only factor with a gradient at first) has moved
    moved = {n for n, p in lora.items() if not torch.equal(now[n], p)}
    assert {n for n in lora if "lora_B" in n} <= moved


@pytest.mark.parametrize("mode", ["frozen", "lora", "full"])
def test_save_load_round_trip_is_bit_exact(qwen_dir, tmp_path, mode):
    torch.manual_seed(0)
    policy = VLAPolicy(vlm_cfg(qwen_dir, mode))
    if mode != "frozen":  # train the VLM part a little so a reload of the pretrained weights would show
        opt = torch.optim.Adam(policy.actor_parameters(), lr=1e-2)
        policy.bc_loss(obs_batch(2), torch.zeros(2, 4, 4)).backward()
        opt.step()
    out = policy.save_pretrained(tmp_path / "pol")
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".pth")) for f in files)  # no pickle anywhere
    saved = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith("vlm.model.") and "lora_" not in k for k in saved)  # base weights not duplicated
    assert any("lora_" in k for k in saved) == (mode == "lora")
    cfg = (out / "config.yaml").read_text()
    assert ("backbone/model.safetensors" in files) == (mode == "full")
    if mode != "full":
        assert str(qwen_dir.resolve()) in cfg and policy.cfg.vlm.revision in cfg  # referenced by path + hash
    loaded = VLAPolicy.from_pretrained(out)
    a, b = policy.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    obs, noise = obs_batch(2), torch.randn(2, 11, 4, 4)
    with torch.no_grad():
        assert torch.equal(policy.sample(obs, noise=noise).actions, loaded.sample(obs, noise=noise).actions)


def test_checkpoint_errors_name_the_directory(qwen_dir, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=f"{missing}.*does not exist"):
        VLAPolicy(vlm_cfg(missing))
    broken = tmp_path / "broken"
    shutil.copytree(qwen_dir, broken)
    (broken / "tokenizer.json").unlink()
    (broken / "tokenizer_config.json").unlink()
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match=f"{broken} is incomplete: missing tokenizer files.*preprocessor_config"):
        VLAPolicy(vlm_cfg(broken))
    pickled = tmp_path / "pickled"
    shutil.copytree(qwen_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors weights.*pytorch_model.bin.*never loaded"):
        VLAPolicy(vlm_cfg(pickled))
    with pytest.raises(ValueError, match="policy.vlm.mode must be one of"):
        VLAPolicy(vlm_cfg(qwen_dir, "qlora"))
    with pytest.raises(ValueError, match="policy.vlm.path is empty"):
        VLAPolicy(vlm_cfg(""))
    with pytest.raises(ValueError, match="lora_targets=\\['nope'\\] match no module"):
        VLAPolicy(vlm_cfg(qwen_dir, "lora", lora_targets=["nope"]))
    with pytest.raises(ValueError, match="policy.cameras is empty"):
        VLAPolicy(vlm_cfg(qwen_dir, cameras=()))
    # a policy saved against one backbone refuses a directory whose weights changed since
    mutable = tmp_path / "mutable"
    shutil.copytree(qwen_dir, mutable)
    torch.manual_seed(0)
    out = VLAPolicy(vlm_cfg(mutable)).save_pretrained(tmp_path / "pol")
    w = load_file(str(mutable / "model.safetensors"))
    k = next(iter(w))
    w[k] = w[k] + 1
    save_file(w, str(mutable / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{mutable} holds other weights.*revision sha256:"):
        VLAPolicy.from_pretrained(out)


def _place_env(n=2):
    from vla_rl.envs import make_env

    return make_env("place", n, seed=0, cameras=["front"], image_size=[IMG, IMG], max_episode_steps=4)  # 2 decisions of 2 actions: episodes end


@pytest.mark.parametrize("algo", ["dppo", "rwr", "dsrl"])
def test_rl_iteration_on_place_with_cameras(qwen_dir, tmp_path, algo):
    from vla_rl.algos import DPPOConfig, DSRLConfig, RWRConfig
    from vla_rl.runner import Runner, RunnerConfig, TrainConfig, train

    env = _place_env()
    obs = env.reset()
    state_dim, action_dim = obs["state"].shape[1], env.spec.action_dim
    torch.manual_seed(0)
    policy = VLAPolicy(vlm_cfg(qwen_dir, "lora", state_dim=state_dim, action_dim=action_dim))
    policy.cfg.privileged_dim = 0
    calls = CountForward(policy)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    cfg = TrainConfig(algo=algo, dppo=DPPOConfig(update_epochs=2, num_minibatches=2),
                      rwr=RWRConfig(update_epochs=1, min_episodes=1, skip_constant=False), dsrl=DSRLConfig(batch_size=4, learning_starts=0, utd=1),
                      runner=RunnerConfig(iterations=1, num_envs=2, steps_per_iter=2, eval_every=0,
                                          checkpoint_every=1, log_dir=str(tmp_path / "run"), progress=False))
    run = train(cfg, policy=policy, env=env)
    changed = {n for n, p in policy.named_parameters() if n in before and not torch.equal(p, before[n])}
    base_changed = {n for n in changed if n.startswith("vlm.model.") and "lora_" not in n}
    assert not base_changed
    if algo == "dsrl":  # DSRL trains its noise actor and critics over the VLM features; the chain stays frozen
        assert policy.noise_actor is not None and not changed
    else:
        assert changed
    if algo == "dppo":  # the head only (DPPO's default): the rollout's VLM passes serve all 2 x 2 log-prob calls
        assert calls.n == 2 and policy.vlm.cache_hits >= 2 * 2 + 4
        assert all(n.startswith(("head.", "critic.")) for n in changed)
    # resume: a fresh runner on a fresh policy continues from the checkpoint with the trained weights
    saved = run / "checkpoint" / "policy"
    assert not any(p.suffix in (".bin", ".pt") for p in saved.rglob("*"))
    if algo == "dppo":
        cfg.runner.iterations = 2
        torch.manual_seed(1)
        r = Runner(cfg, policy=VLAPolicy(vlm_cfg(qwen_dir, "lora", state_dim=state_dim, action_dim=action_dim)),
                   env=_place_env())
        assert r.iteration == 1
        mine, theirs = r.policy.state_dict(), policy.state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_bc_pretraining_on_place_with_cameras(qwen_dir, tmp_path, capsys):
    from vla_rl.cli import main
    from vla_rl.collect import collect_demos

    collect_demos("place", 2, tmp_path / "demos", num_envs=2, cameras=("front",), image_size=(IMG, IMG), max_steps=20,
                  keep_failed=True, max_episode_steps=6)  # short episodes, kept even when they end unfinished
    args = ["pretrain", "--data", str(tmp_path / "demos"), "--out", str(tmp_path / "bc"), "steps=2", "batch_size=4",
            "only_success=false", "progress=false", "policy.horizon=4", "policy.exec_steps=2",
            "policy.cameras=[front]", "policy.language_encoder=hash", "policy.dit.d_model=32", "policy.dit.n_heads=4",
            "policy.fusion_layers=0", "policy.backbone=transformers", f"policy.vlm.path={qwen_dir}",
            "policy.vlm.mode=lora", "policy.vlm.tokens=4", "policy.vlm.lora_r=4"]
    assert main(args[:-3] + ["policy.vlm.mode=qlora"]) == 2  # a bad value fails at start-up, key named
    assert "policy.vlm.mode='qlora' is not allowed" in capsys.readouterr().err
    assert main(args) == 0
    assert "trainable (VLM qwen2_vl" in capsys.readouterr().out  # the parameter count, printed at start
    out = tmp_path / "bc"
    loaded = VLAPolicy.from_pretrained(out)
    assert loaded.vlm is not None and loaded.cfg.vlm.mode == "lora"
    assert any("lora_" in k for k in load_file(str(out / "model.safetensors")))


def test_export_refuses_and_serve_runs_the_torch_policy_over_a_socket(qwen_dir, tmp_path, capsys, monkeypatch):
    from vla_rl.cli import main
    from vla_rl.deploy import server as server_mod
    from vla_rl.deploy.server import PolicyClient, start_server_thread
    from vla_rl.deploy.torch_runtime import TorchPolicyRuntime
    from vla_rl.export import ExportRefused, export_bundle

    torch.manual_seed(0)
    policy = VLAPolicy(vlm_cfg(qwen_dir, "lora"))
    out = policy.save_pretrained(tmp_path / "pol")
    with pytest.raises(ExportRefused, match="transformers VLM.*image processor.*tokenizer.*vla-rl serve"):
        export_bundle(out, tmp_path / "bundle", hold="zero")
    assert main(["export", str(out), "--out", str(tmp_path / "bundle"), "--hold", "zero"]) == 2
    err = capsys.readouterr().err
    assert "ExportRefused" in err and "qwen2_vl" in err and f"vla-rl serve {out}" in err
    assert not (tmp_path / "bundle").exists()

    # `vla-rl serve <policy dir>` builds the torch runtime (the blocking serve loop is swapped for a capture;
    # the runtime is then served on a real socket below)
    served = []
    monkeypatch.setattr(server_mod, "serve", lambda runtime, *a, **k: served.append(runtime))
    assert main(["serve", str(out), "--port", "0", "--hold", "zero"]) == 0
    assert isinstance(served[0], TorchPolicyRuntime) and served[0].manifest["action"]["hold"] == ["zero"] * 4
    assert main(["serve", str(tmp_path / "nothing")]) == 2  # neither a bundle nor a policy directory: named
    assert str(tmp_path / "nothing") in capsys.readouterr().err
    rt = TorchPolicyRuntime.load(out, hold="zero", action_bounds=(-1.0, 1.0))
    server = start_server_thread(rt, session_defaults={"seed": 3})
    try:
        obs = obs_batch(1)
        message = {"state": obs["state"][0].numpy(), "rgb": obs["rgb"][0].numpy(), "instruction": obs["instruction"][0]}
        with PolicyClient(server.url) as client:
            meta = client.get_metadata()
            assert meta["runtime"] == "torch" and meta["observation"]["cameras"] == ["front"]
            reply = client.act(message)
        assert reply["status"] == "ok"
        # the served action is the torch policy's first action of the chunk drawn with the session's noise
        noise = np.random.default_rng(3).standard_normal(rt.noise_shape(1), dtype=np.float32)
        with torch.no_grad():
            ref = policy.sample(obs, noise=torch.from_numpy(noise)).actions[0, 0].clamp(-1, 1).numpy()
        np.testing.assert_allclose(np.asarray(reply["action"], dtype=np.float32), ref, atol=1e-5)
    finally:
        server.stop()
    assert json.loads(json.dumps(meta))["model"]["source"] == str(out)



def test_copied_backbone_and_bf16_weights(qwen_dir, tmp_path):
    original = tmp_path / "models" / "qwen"
    shutil.copytree(qwen_dir, original)
    torch.manual_seed(0)
    policy = VLAPolicy(vlm_cfg(original, "lora", copy=True, dtype="bfloat16"))
    assert all(p.dtype == torch.bfloat16 for n, p in policy.vlm.model.named_parameters() if "lora_" not in n)
    obs, noise = obs_batch(2), torch.randn(2, 11, 4, 4)
    with torch.no_grad():
        ref = policy.sample(obs, noise=noise).actions
    assert torch.isfinite(ref).all()
    out = policy.save_pretrained(tmp_path / "pol")
    shutil.rmtree(original)  # the policy directory is self-contained: backbone/ holds the VLM
    loaded = VLAPolicy.from_pretrained(out)
    assert loaded.vlm.directory == out / "backbone" and loaded.cfg.vlm.revision == policy.cfg.vlm.revision
    with torch.no_grad():
        assert torch.equal(loaded.sample(obs, noise=noise).actions, ref)
    shutil.rmtree(out / "backbone")
    with pytest.raises(CheckpointError, match=f"VLM backbone directory {out / 'backbone'} does not exist"):
        VLAPolicy.from_pretrained(out)
