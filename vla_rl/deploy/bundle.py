"""The exported bundle on disk: manifest schema constants, checksums and validation (numpy only, no torch)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
POLICY_ONNX = "policy.onnx"
LANGUAGE_ONNX = "language.onnx"
LANGUAGE_HASH = "language_hash.npy"
TOKENIZER = "tokenizer.json"
TORCHSCRIPT = "policy.torchscript.pt"
TORCH_EXPORT = "policy.pt2"
BUNDLE_FORMAT = "vla-rl-bundle"
BUNDLE_VERSION = 1


class BundleError(ValueError):
    """A bundle is missing, incomplete, tampered with or of an unsupported format."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checksums(directory: str | Path) -> dict[str, str]:
    """sha256 of every regular file in ``directory`` except the manifest."""
    directory = Path(directory)
    return {
        f.name: sha256_file(f) for f in sorted(directory.iterdir()) if f.is_file() and f.name != MANIFEST
    }


def read_manifest(bundle_dir: str | Path, verify: bool = True) -> dict:
    """Read ``manifest.json``, check the format and (``verify``) every file's sha256.

    Raises :class:`BundleError` naming the offending file."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory not found: {bundle_dir}")
    path = bundle_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{bundle_dir} is not a bundle: {MANIFEST} is missing") from None
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: not a {BUNDLE_FORMAT} manifest")
    if manifest.get("format_version") != BUNDLE_VERSION:
        raise BundleError(f"{path}: unsupported bundle format_version {manifest.get('format_version')!r} "
                          f"(this runtime reads {BUNDLE_VERSION})")
    for key in ("observation", "action", "chunking", "denoising", "language", "safety", "files", "checksums"):
        if key not in manifest:
            raise BundleError(f"{path}: manifest lacks the {key!r} section")
    sums = manifest["checksums"]
    for role, name in manifest["files"].items():
        if name is not None and name not in sums:
            raise BundleError(f"{path}: file {name!r} ({role}) has no checksum in the manifest")
    if verify:
        for name, digest in sums.items():
            if Path(name).name != name:
                raise BundleError(f"{path}: bad file name {name!r} in checksums")
            f = bundle_dir / name
            if not f.is_file():
                raise BundleError(f"bundle {bundle_dir}: file {name} is missing")
            got = sha256_file(f)
            if got != digest:
                raise BundleError(
                    f"bundle {bundle_dir}: checksum mismatch for {name} (sha256 {got[:16]}..., manifest says "
                    f"{digest[:16]}...); the file was modified or corrupted after export"
                )
    return manifest
