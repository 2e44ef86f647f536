"""A transformers vision-language model as the policy's observation backbone (``policy.backbone=transformers``).

Every camera image and the instruction go through the VLM, as in the VLAs this library fine-tunes (a VLM
conditioning a diffusion / flow action expert: pi0 on PaliGemma, Qwen-VLA on a Qwen VLM, SmolVLA on
SmolVLM). The hidden states of one layer (``vlm.layer``) are pooled into ``vlm.tokens`` conditioning
tokens by learned queries (cross-attention) after a linear projection to the action head's width, so the
head sees a fixed number of tokens whatever the prompt length.

The model is loaded from a *local directory* with the transformers Auto classes (``AutoConfig``,
``AutoModel`` with ``use_safetensors=True``: a pickled ``pytorch_model.bin`` is never loaded,
``AutoTokenizer``, ``AutoImageProcessor``), the same path a user's checkpoint takes. The processor's
prompt layout (how many image placeholder tokens per camera, which extra ids the model wants) is the one
family-specific piece; :data:`FAMILIES` holds it for the Qwen-VL family (``qwen2_vl``, ``qwen2_5_vl``) and
PaliGemma (``paligemma``, the VLM of pi0). ``AutoProcessor`` itself is not used because the Qwen-VL
processors insist on a video processor, which needs torchvision; the image processor and tokenizer it
would wrap are loaded from the same files.

Training modes (``vlm.mode``): ``frozen`` (only the projector and the action head train), ``lora``
(``peft`` adapters on ``vlm.lora_targets``; the base weights never change) or ``full``.

Features are computed once per observation: ``sample`` encodes once and reuses the tokens across all K
denoising steps, ``log_prob`` once for all K' transitions, and while the VLM's weights are not being
trained (frozen, or an algorithm that trains only the head, e.g. DPPO's default) a content-keyed cache
returns the hidden states of an observation already seen, so the update's log-prob evaluations (every
epoch, every minibatch, the old log-probs) reuse the features the rollout computed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import CheckpointError
from ..config import ge, gt, one_of, register_rules

log = logging.getLogger(__name__)

MODES = ("frozen", "lora", "full")
DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class VLMConfig:
    """The transformers VLM backbone (``PolicyConfig.backbone = "transformers"``)."""

    # Local model directory (config.json, *.safetensors, tokenizer files, preprocessor_config.json). In a
    # saved policy: an absolute path (referenced) or a path relative to the policy directory (copied in).
    path: str = ""
    # sha256 over the directory's config.json and *.safetensors; recorded at first load, checked at every
    # later one, so a policy never runs on weights it was not trained with.
    revision: str = ""
    mode: str = "frozen"  # "frozen" | "lora" | "full"
    layer: int = -1  # hidden-states index that feeds the projector (-1: the last layer, 0: the embeddings)
    tokens: int = 8  # conditioning tokens the learned queries pool the VLM's sequence into
    lora_r: int = 16
    lora_alpha: int = 32  # (no LoRA dropout: the VLM always runs in eval mode, see VLMBackbone.train)
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # "auto": float32 weights, bfloat16 autocast on CUDA, float32 compute on CPU (CPU bf16 matmuls are slow
    # on most CPUs); "bfloat16": bf16 weights and compute everywhere (half the memory); "float32": no autocast.
    dtype: str = "auto"
    # Observations whose hidden states are kept while the VLM is not trained (LRU). To compute each rollout
    # observation once, keep it >= num_envs x steps_per_iter. Memory per entry: prompt tokens x hidden width
    # x 4 bytes (0.36 MB for the ~0.5B Qwen2-VL class with one 224 px camera: 100 tokens x 896). 0 = off.
    feature_cache: int = 4096
    # save_pretrained copies the backbone directory into the policy directory (always done for "full",
    # whose weights are the fine-tuned ones) instead of referencing it by path + revision.
    copy: bool = False


register_rules(VLMConfig, mode=one_of(*MODES), dtype=one_of(*DTYPES), tokens=gt(0), lora_r=gt(0), lora_alpha=gt(0),
               feature_cache=ge(0))


def check_vlm_config(c: VLMConfig) -> None:
    """Bad values fail at start-up with the key named."""
    bad = []
    if c.mode not in MODES:
        bad.append(f"policy.vlm.mode must be one of {MODES}, got {c.mode!r}")
    if c.dtype not in DTYPES:
        bad.append(f"policy.vlm.dtype must be one of {DTYPES}, got {c.dtype!r}")
    if c.tokens < 1:
        bad.append(f"policy.vlm.tokens must be >= 1, got {c.tokens}")
    if c.lora_r < 1 or c.lora_alpha <= 0:
        bad.append(f"policy.vlm.lora_r must be >= 1 and lora_alpha > 0, got {c.lora_r}, {c.lora_alpha}")
    if c.mode == "lora" and not c.lora_targets:
        bad.append("policy.vlm.lora_targets is empty: name the modules LoRA adapts (e.g. q_proj, v_proj)")
    if c.feature_cache < 0:
        bad.append(f"policy.vlm.feature_cache must be >= 0, got {c.feature_cache}")
    if not c.path:
        bad.append("policy.vlm.path is empty: policy.backbone=transformers needs a local model directory")
    if bad:
        raise ValueError("; ".join(bad))


# ---------------------------------------------------------------------- the model directory
def weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def revision_hash(directory: str | os.PathLike) -> str:
    """sha256 over config.json and every *.safetensors file (names and contents), in name order."""
    directory = Path(directory)
    h = hashlib.sha256()
    for f in [directory / "config.json", *weight_files(directory)]:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


def check_model_dir(directory: str | os.PathLike) -> Path:
    """A readable transformers VLM directory, or a CheckpointError naming the directory and what is missing."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise CheckpointError(f"VLM backbone directory {d} does not exist (policy.vlm.path)")
    missing = []
    if not (d / "config.json").is_file():
        missing.append("config.json (the model config)")
    if not weight_files(d):
        pickled = [p.name for p in d.glob("*.bin")]
        missing.append("*.safetensors weights" + (f" (found {pickled}: pickled weights are never loaded; convert them "
                                                  "with save_pretrained(safe_serialization=True))" if pickled else ""))
    if not ((d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()):
        missing.append("tokenizer files (tokenizer.json / tokenizer_config.json)")
    if not (d / "preprocessor_config.json").is_file():
        missing.append("preprocessor_config.json (the image processor)")
    if missing:
        raise CheckpointError(f"VLM backbone directory {d} is incomplete: missing {', '.join(missing)}")
    return d


# ---------------------------------------------------------------------- per-family prompt layout
class _Family:
    """How one VLM family wants its images and text laid out (what its processor would do)."""

    def __init__(self, tokenizer, image_processor, config):
        self.tokenizer, self.image_processor, self.config = tokenizer, image_processor, config

    def pixel_inputs(self, images: list[np.ndarray]) -> dict:
        raise NotImplementedError

    def prompt(self, n_cameras: int, tokens_per_image: int, instruction: str) -> list[int]:
        raise NotImplementedError

    def extra_inputs(self, input_ids: torch.Tensor) -> dict:
        return {}


class _QwenVL(_Family):
    """Qwen2-VL / Qwen2.5-VL: per image <|vision_start|> <|image_pad|> x (grid t*h*w / merge^2) <|vision_end|>."""

    def __init__(self, tokenizer, image_processor, config):
        super().__init__(tokenizer, image_processor, config)
        import inspect

        from transformers import Qwen2VLModel

        self.takes_mm_token_type_ids = "mm_token_type_ids" in inspect.signature(Qwen2VLModel.forward).parameters

    def pixel_inputs(self, images):
        out = self.image_processor(images=images, return_tensors="pt")
        merge = int(getattr(self.image_processor, "merge_size", 2))
        n = int(out["image_grid_thw"][0].prod()) // (merge * merge)
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}, n

    def prompt(self, n_cameras, tokens_per_image, instruction):
        c = self.config
        image = [c.vision_start_token_id, *[c.image_token_id] * tokens_per_image, c.vision_end_token_id]
        return image * n_cameras + self.tokenizer(instruction, add_special_tokens=False)["input_ids"]

    def extra_inputs(self, input_ids):
        # transformers 5 computes the multimodal RoPE positions from the modality of each token (1 = image);
        # transformers 4 finds the image tokens itself and has no such argument
        if not self.takes_mm_token_type_ids:
            return {}
        return {"mm_token_type_ids": (input_ids == self.config.image_token_id).long()}


class _PaliGemma(_Family):
    """PaliGemma (pi0's VLM): <image> x image_seq_length per image, then <bos> instruction "\\n"."""

    def pixel_inputs(self, images):
        out = self.image_processor(images=images, return_tensors="pt")
        n = int(getattr(self.image_processor, "image_seq_length", 0) or self.config.text_config.num_image_tokens)
        return {"pixel_values": out["pixel_values"]}, n

    def prompt(self, n_cameras, tokens_per_image, instruction):
        tok = self.tokenizer
        text = tok(instruction + "\n", add_special_tokens=False)["input_ids"]
        return [self.config.image_token_id] * (tokens_per_image * n_cameras) + [tok.bos_token_id] + text

    def extra_inputs(self, input_ids):
        # token type 0 everywhere: the whole observation is PaliGemma's bidirectional prefix
        return {"token_type_ids": torch.zeros_like(input_ids)}


FAMILIES = {"qwen2_vl": _QwenVL, "qwen2_5_vl": _QwenVL, "paligemma": _PaliGemma}


# ---------------------------------------------------------------------- the backbone module
class VLMBackbone(nn.Module):
    """``forward(rgb uint8 [B, cams, 3, H, W], instructions) -> [B, vlm.tokens, d_model]``."""

    def __init__(self, cfg: VLMConfig, num_cameras: int, d_model: int, n_heads: int):
        super().__init__()
        check_vlm_config(cfg)
        try:
            import transformers  # noqa: F401
        except ImportError as e:
            raise ImportError("policy.backbone=transformers needs the vlm extra: pip install 'vla-rl[vlm]'") from e
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

        self.cfg = cfg
        self.directory = d = check_model_dir(cfg.path)
        revision = revision_hash(d)
        if cfg.revision and cfg.revision != revision:
            raise CheckpointError(f"VLM backbone directory {d} holds other weights than this policy was trained with "
                                  f"(revision {cfg.revision}, the directory has {revision}); point policy.vlm.path at "
                                  "the original model directory")
        cfg.revision = revision
        hf_cfg = AutoConfig.from_pretrained(d, local_files_only=True)
        if hf_cfg.model_type not in FAMILIES:
            raise CheckpointError(f"VLM backbone directory {d}: model_type {hf_cfg.model_type!r} is not supported; "
                                  f"supported: {sorted(FAMILIES)}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(d, local_files_only=True)
            image_processor = AutoImageProcessor.from_pretrained(d, local_files_only=True)
            # float32 master weights unless asked for bf16 ones (half the memory, for a frozen or LoRA VLM)
            dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
            model = AutoModel.from_pretrained(d, local_files_only=True, use_safetensors=True, dtype=dtype)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"VLM backbone directory {d} cannot be loaded: {e}") from e
        self.model_type = hf_cfg.model_type
        self.family = FAMILIES[hf_cfg.model_type](tokenizer, image_processor, hf_cfg)
        self.num_cameras = num_cameras
        text_cfg = getattr(hf_cfg, "text_config", hf_cfg)
        self.hidden_size = int(text_cfg.hidden_size)
        n_layers = int(text_cfg.num_hidden_layers)
        if not -(n_layers + 1) <= cfg.layer <= n_layers:
            raise ValueError(f"policy.vlm.layer must be in [{-(n_layers + 1)}, {n_layers}] for {d} "
                             f"({n_layers} layers), got {cfg.layer}")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        if cfg.mode == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                              target_modules=list(cfg.lora_targets))
            try:
                with warnings.catch_warnings():  # peft calls a transformers method deprecated in 5.x (FutureWarning)
                    warnings.simplefilter("ignore", FutureWarning)
                    model = get_peft_model(model, lora)
            except ValueError as e:  # no module matched the targets
                raise ValueError(f"policy.vlm.lora_targets={list(cfg.lora_targets)} match no module of {d}: {e}") from e
        for name, p in model.named_parameters():
            p.requires_grad_(cfg.mode == "full" or (cfg.mode == "lora" and "lora_" in name))
        self.model = model.eval()
        # Projector: VLM width -> head width, then learned queries pool the sequence into a fixed token count.
        self.proj = nn.Linear(self.hidden_size, d_model)
        self.queries = nn.Parameter(torch.randn(cfg.tokens, d_model) * 0.02)
        self.pool = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self._prompts: dict[str, list[int]] = {}
        self._cache: OrderedDict = OrderedDict()
        self._cache_key = None
        self._hash_weights: torch.Tensor | None = None
        self._warned_eviction = False
        self.forward_calls = 0  # VLM forward passes run (tests and benchmarks count them)
        self.cache_hits = 0

    # -- parameters
    def base_state_keys(self) -> set[str]:
        """state_dict keys (relative to this module) of the pretrained VLM weights (not LoRA adapters)."""
        return {"model." + k for k in self.model.state_dict() if "lora_" not in k}

    def frozen_parameters(self) -> set[int]:
        """ids of parameters the training mode keeps fixed (frozen: the whole VLM; lora: its base weights)."""
        if self.cfg.mode == "full":
            return set()
        return {id(p) for n, p in self.model.named_parameters() if "lora_" not in n}

    def parameter_counts(self) -> dict:
        total = sum(p.numel() for p in self.model.parameters())
        frozen = self.frozen_parameters()
        trainable_vlm = sum(p.numel() for p in self.model.parameters() if id(p) not in frozen)
        projector = sum(p.numel() for n, p in self.named_parameters() if not n.startswith("model."))
        return {"vlm_total": total, "vlm_trainable": trainable_vlm, "projector": projector}

    def train(self, mode: bool = True):
        # The VLM always runs in eval mode: dropout in it would make the features (and so the PPO ratio's
        # old and new log-likelihoods) differ between two evaluations of the same observation.
        super().train(mode)
        self.model.eval()
        return self

    def _apply(self, fn, recurse=True):
        self._cache.clear()  # a dtype/device move makes new tensors; cached features may not match them
        self._hash_weights = None
        return super()._apply(fn, recurse)

    # -- features
    def _autocast(self, device: torch.device):
        use_bf16 = self.cfg.dtype == "bfloat16" or (self.cfg.dtype == "auto" and device.type == "cuda")
        if use_bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return torch.autocast(device.type, enabled=False)

    def _row_keys(self, rgb: torch.Tensor, instructions: list[str]) -> list:
        """A content key per observation: two integer hashes of the pixels and the instruction. The hashes are
        float64 dot products with random integer weights < 2^20: every partial sum stays below 2^53 (for up to
        2^25 pixel values per observation), so they are exact whatever the summation order, and the same
        pixels give the same key at any batch size, on any device."""
        flat = rgb.reshape(rgb.shape[0], -1)
        if flat.shape[1] > 2**25:
            raise ValueError(f"observation of {flat.shape[1]} pixel values is too large for the feature-cache key")
        if self._hash_weights is None or self._hash_weights.shape[0] != flat.shape[1] \
                or self._hash_weights.device != flat.device:
            g = torch.Generator().manual_seed(0)
            self._hash_weights = torch.randint(0, 2**20, (flat.shape[1], 2), generator=g).to(flat.device, torch.float64)
        # a few rows at a time: the float64 copy of a large batch of images would be large
        h = torch.cat([flat[i:i + 16].to(torch.float64) @ self._hash_weights for i in range(0, len(flat), 16)])
        return [(int(a), int(b), s) for (a, b), s in zip(h.tolist(), instructions)]

    def _weights_key(self):
        return tuple((p.device, p._version) for p in self.model.parameters())

    def _trains_vlm(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters())

    def hidden_states(self, rgb: torch.Tensor, instructions: list[str]):
        """[B, L, hidden] float32 hidden states of layer ``vlm.layer`` and the [B, L] bool mask of real tokens."""
        use_cache = self.cfg.feature_cache > 0 and not self._trains_vlm()
        if not use_cache:
            return self._run_vlm(rgb, instructions)
        wkey = self._weights_key()
        if wkey != self._cache_key:  # the VLM changed (an update, a load): every cached feature is stale
            self._cache.clear()
            self._cache_key = wkey
        keys = self._row_keys(rgb, instructions)
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        if todo:
            idx = torch.tensor(todo, device=rgb.device)
            h, m = self._run_vlm(rgb.index_select(0, idx), [instructions[i] for i in todo])
            for j, i in enumerate(todo):
                n = int(m[j].sum())
                self._cache[keys[i]] = h[j, :n].detach()
        self.cache_hits += len(keys) - len(todo)
        rows = []
        for k in keys:
            self._cache.move_to_end(k)
            rows.append(self._cache[k])
        if len(self._cache) > self.cfg.feature_cache and not self._warned_eviction:
            self._warned_eviction = True
            log.warning("policy.vlm.feature_cache=%d observations is full: older features are dropped and the "
                        "update recomputes them; keep it >= num_envs x steps_per_iter to run the VLM once per "
                        "observation", self.cfg.feature_cache)
        while len(self._cache) > self.cfg.feature_cache:
            self._cache.popitem(last=False)
        return _pad_rows(rows)

    def _run_vlm(self, rgb: torch.Tensor, instructions: list[str]):
        b, cams = rgb.shape[:2]
        device = next(self.model.parameters()).device
        # The image processor is the checkpoint's own (numpy / PIL): the pixels go through the host once
        # per VLM call, which the feature cache keeps to once per observation.
        images = list(rgb.reshape(b * cams, *rgb.shape[2:]).cpu().numpy())
        pixels, per_image = self.family.pixel_inputs(images)
        seqs = [self._prompt(per_image, s) for s in instructions]
        width = max(len(s) for s in seqs)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for i, s in enumerate(seqs):  # right padding: the image tokens stay at the same positions in every row
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        ids, mask = ids.to(device), mask.to(device)
        inputs = {"input_ids": ids, "attention_mask": mask, **self.family.extra_inputs(ids),
                  **{k: v.to(device) for k, v in pixels.items()}}
        self.forward_calls += 1
        with self._autocast(device):
            out = self.model(**inputs, output_hidden_states=True, return_dict=True)
        return out.hidden_states[self.cfg.layer].float(), mask.bool()

    def _prompt(self, per_image: int, instruction: str) -> list[int]:
        key = f"{per_image}\0{instruction}"
        ids = self._prompts.get(key)
        if ids is None:
            ids = self._prompts[key] = self.family.prompt(self.num_cameras, per_image, instruction)
        return ids

    def forward(self, rgb: torch.Tensor, instructions: list[str]) -> torch.Tensor:
        h, mask = self.hidden_states(rgb, instructions)
        kv = self.proj(h.to(self.proj.weight.dtype))
        q = self.queries[None].expand(kv.shape[0], -1, -1)
        pooled, _ = self.pool(q, kv, kv, key_padding_mask=~mask, need_weights=False)
        return self.norm(pooled + q)

    # -- checkpoints
    def save_backbone(self, out: Path) -> None:
        """Write the backbone as a model directory: the original files when its weights are the pretrained
        ones (frozen / LoRA: bit-identical, same revision), else the fine-tuned model (full)."""
        if self.cfg.mode != "full":
            shutil.copytree(self.directory, out)
            return
        out.mkdir(parents=True)
        self.model.save_pretrained(out, safe_serialization=True)
        self.family.tokenizer.save_pretrained(out)
        self.family.image_processor.save_pretrained(out)


def _pad_rows(rows: list[torch.Tensor]):
    width = max(r.shape[0] for r in rows)
    h = rows[0].new_zeros((len(rows), width, rows[0].shape[1]))
    mask = torch.zeros((len(rows), width), dtype=torch.bool, device=h.device)
    for i, r in enumerate(rows):
        h[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return h, mask


# ---------------------------------------------------------------------- tiny models (tests, benchmarks)
def _byte_tokenizer(specials: list[str], **kwargs):
    """A byte-level BPE tokenizer with no merges (every string encodes; vocab 256 + specials), built
    locally because no model hub is reachable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def tiny_vlm_config(family: str, tokenizer, size: str = "tiny", image_size: int = 32):
    """A transformers config of ``family`` ("qwen2_vl" or "paligemma") at ``size``: "tiny" (tests: width 32,
    1-2 layers), or "0.5b" / "2b" (the size classes of real VLAs, for parameter counts and benchmarks)."""
    from transformers import PaliGemmaConfig, Qwen2VLConfig

    ids = tokenizer.convert_tokens_to_ids
    vocab = len(tokenizer) if size == "tiny" else (151936 if family == "qwen2_vl" else 257216)
    if family == "qwen2_vl":
        text = {"tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1),
                # Qwen2.5-0.5B's language model with a 12-layer vision tower: the ~0.5B class
                "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                             num_key_value_heads=2),
                # Qwen2-VL-2B-Instruct's published config
                "2b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                           num_key_value_heads=2)}[size]
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        # M-RoPE sections (t, h, w) sum to head_dim / 2 (Qwen2-VL: [16, 24, 24] for head_dim 128)
        section = [head_dim // 8, 3 * head_dim // 16, head_dim // 2 - head_dim // 8 - 3 * head_dim // 16]
        vision = {"tiny": dict(depth=1, embed_dim=32, num_heads=2, patch_size=8),
                  "0.5b": dict(depth=12, embed_dim=768, num_heads=12, patch_size=14),
                  "2b": dict(depth=32, embed_dim=1280, num_heads=16, patch_size=14)}[size]
        return Qwen2VLConfig(
            text_config=dict(vocab_size=vocab, max_position_embeddings=4096, bos_token_id=None,
                             eos_token_id=ids("<|endoftext|>"),
                             rope_scaling={"type": "mrope", "mrope_section": section}, **text),
            vision_config=dict(hidden_size=text["hidden_size"], mlp_ratio=4 if size != "tiny" else 2,
                               spatial_merge_size=2, temporal_patch_size=2, in_channels=3, **vision),
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
            bos_token_id=None, eos_token_id=ids("<|endoftext|>"), pad_token_id=ids("<|endoftext|>"))
    if family == "paligemma":
        text = {"tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=16),
                # Gemma-2B (PaliGemma's language model, as in pi0)
                "2b": dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                           num_key_value_heads=1, head_dim=256)}[size]
        vision = {"tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               patch_size=8, image_size=image_size),
                  # SigLIP-So400m/14 at 224 px
                  "2b": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                             patch_size=14, image_size=224)}[size]
        n_img = (vision["image_size"] // vision["patch_size"]) ** 2
        return PaliGemmaConfig(
            text_config=dict(model_type="gemma", vocab_size=vocab, num_image_tokens=n_img, **text),
            vision_config=dict(model_type="siglip_vision_model", projection_dim=text["hidden_size"], **vision),
            image_token_id=ids("<image>"), projection_dim=text["hidden_size"], hidden_size=text["hidden_size"],
            pad_token_id=ids("<pad>"), bos_token_id=ids("<bos>"), eos_token_id=ids("<eos>"))
    raise ValueError(f"unknown VLM family {family!r}; choose 'qwen2_vl' or 'paligemma'")


def build_tiny_vlm(family: str, out_dir: str | os.PathLike, image_size: int = 32, seed: int = 0) -> Path:
    """Write a randomly initialised tiny VLM of a real architecture (model, tokenizer, image processor) to
    ``out_dir``, loadable as a user's checkpoint is. No hub access: everything is built from configs."""
    from transformers import AutoModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if family == "qwen2_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tok = _byte_tokenizer(["<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
                              eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        side = image_size * image_size
        ip = Qwen2VLImageProcessorPil(min_pixels=side, max_pixels=side, patch_size=8, merge_size=2,
                                      temporal_patch_size=2)
    elif family == "paligemma":
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        tok = _byte_tokenizer(["<pad>", "<bos>", "<eos>", "<image>"], pad_token="<pad>", bos_token="<bos>",
                              eos_token="<eos>")
        ip = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
        ip.image_seq_length = (image_size // 8) ** 2
    else:
        raise ValueError(f"unknown VLM family {family!r}; choose 'qwen2_vl' or 'paligemma'")
    config = tiny_vlm_config(family, tok, "tiny", image_size)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    ip.save_pretrained(out)
    return out
