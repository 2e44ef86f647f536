"""Instruction encoders of an exported bundle, without torch.

* ``hash``: the learned word-hash bag; the hashing rule here must match
  ``vla_rl.policy.encoders.LanguageEncoder.word_ids`` exactly (tested).
* ``minilm``: the exported BERT graph (``language.onnx``: token ids -> mean-pooled, L2-normalized
  embedding) fed by the ``tokenizers`` package from the bundle's ``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .bundle import LANGUAGE_HASH, LANGUAGE_ONNX, TOKENIZER, BundleError

_WORD = re.compile(r"[a-z0-9]+")


def hash_word_ids(text: str, buckets: int) -> list[int]:
    words = _WORD.findall(text.lower()) or ["<empty>"]
    return [int(hashlib.md5(w.encode()).hexdigest()[:8], 16) % buckets for w in words]


class HashLanguage:
    def __init__(self, table: np.ndarray, buckets: int):
        if table.ndim != 2 or table.shape[0] != buckets:
            raise BundleError(f"{LANGUAGE_HASH}: expected a [{buckets}, dim] table, got {list(table.shape)}")
        self.table = np.ascontiguousarray(table, dtype=np.float32)
        self.buckets = buckets
        self.dim = table.shape[1]

    def __call__(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.table[hash_word_ids(t, self.buckets)].mean(0) for t in texts]).astype(np.float32)


class MiniLMLanguage:
    def __init__(self, onnx_path: Path, tokenizer_path: Path, max_length: int, providers=None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest in the batch
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=providers or ["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.dim = self.session.get_outputs()[0].shape[-1]

    def __call__(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer.encode_batch(list(texts))
        feeds = {
            "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
        }
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        return self.session.run(None, feeds)[0].astype(np.float32)


class CachedLanguage:
    """Embeds each distinct instruction once (instructions rarely change within an episode).

    Bounded in entries and in bytes (text + embedding), least recently used out first, so that clients
    sending ever new instructions cannot grow it without end. Thread-safe: the encoder runs outside
    the cache lock, so one client's new instruction does not stall the others' cached look-ups."""

    ENTRY_OVERHEAD = 128  # bytes of bookkeeping per entry (key object, dict slot), roughly

    def __init__(self, encoder, max_entries: int = 4096, max_bytes: int = 16 << 20):
        self.encoder = encoder
        self.dim = encoder.dim
        self.max_entries, self.max_bytes = int(max_entries), int(max_bytes)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.nbytes = 0
        self._lock = threading.Lock()

    @classmethod
    def _cost(cls, text: str, emb: np.ndarray) -> int:
        return len(text.encode("utf-8", "surrogatepass")) + emb.nbytes + cls.ENTRY_OVERHEAD

    def __call__(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            found = {t: self._cache[t] for t in texts if t in self._cache}
            for t in found:
                self._cache.move_to_end(t)
        missing = sorted({t for t in texts if t not in found})
        if missing:
            new = dict(zip(missing, self.encoder(missing)))
            found.update(new)
            with self._lock:
                for t, e in new.items():
                    self._insert(t, e)
        return np.stack([found[t] for t in texts])

    def _insert(self, text: str, emb: np.ndarray) -> None:
        cost = self._cost(text, emb)
        if cost > self.max_bytes or text in self._cache:
            return
        while self._cache and (len(self._cache) >= self.max_entries or self.nbytes + cost > self.max_bytes):
            old_text, old = self._cache.popitem(last=False)
            self.nbytes -= self._cost(old_text, old)
        self._cache[text] = emb
        self.nbytes += cost


def load_language(bundle_dir: Path, manifest: dict, providers=None) -> CachedLanguage:
    spec = manifest["language"]
    kind = spec.get("kind")
    if kind == "hash":
        table = np.load(bundle_dir / LANGUAGE_HASH, allow_pickle=False)
        return CachedLanguage(HashLanguage(table, int(spec["buckets"])))
    if kind == "minilm":
        return CachedLanguage(MiniLMLanguage(bundle_dir / LANGUAGE_ONNX, bundle_dir / TOKENIZER,
                                             int(spec.get("max_length", 64)), providers))
    raise BundleError(f"unknown language encoder kind {kind!r} in manifest")
