"""The exported bundle on disk: manifest schema constants, checksums and validation (numpy only, no torch)."""

from __future__ import annotations

import hashlib
import json
import math
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


HOLD_RULES = ("zero", "last")  # per action dim, or a fixed number; see vla_rl.deploy.safety


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
    for key in ("files", "checksums"):
        _section(manifest, key, path)
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
    validate_manifest(manifest, path)
    return manifest


# ---------------------------------------------------------------------- manifest values
# Checked once at load so that a bad manifest fails there, naming the field, and not on every request.
def _where(path, field: str) -> str:
    return f"{path}: {field}"


def _int(section: dict, key: str, path, field: str, low: int = 1) -> int:
    v = section.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise BundleError(f"{_where(path, field)} must be an integer >= {low}, got {v!r}")
    return v


def _number(v, path, field: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BundleError(f"{_where(path, field)} must be a finite number, got {v!r}")
    return float(v)


def _numbers(v, dim: int, path, field: str) -> list[float]:
    if not isinstance(v, list) or len(v) != dim:
        raise BundleError(f"{_where(path, field)} must be a list of {dim} finite numbers (action.dim), got {v!r}")
    return [_number(x, path, f"{field}[{i}]") for i, x in enumerate(v)]


def _section(manifest: dict, key: str, path) -> dict:
    v = manifest.get(key)
    if not isinstance(v, dict):
        raise BundleError(f"{_where(path, key)} must be a JSON object (the {key!r} section), got {v!r}")
    return v


def validate_manifest(manifest: dict, path="manifest.json") -> None:
    """Types and consistency of the values the runtime and its safety filter use (raises :class:`BundleError`)."""
    obs, chunk = _section(manifest, "observation", path), _section(manifest, "chunking", path)
    _int(obs, "state_dim", path, "observation.state_dim")
    horizon = _int(chunk, "horizon", path, "chunking.horizon")
    exec_steps = _int(chunk, "exec_steps", path, "chunking.exec_steps")
    if exec_steps > horizon:
        raise BundleError(f"{_where(path, 'chunking.exec_steps')} must be in [1, horizon={horizon}], got {exec_steps}")
    if _number(chunk.get("control_hz"), path, "chunking.control_hz") <= 0:
        raise BundleError(f"{_where(path, 'chunking.control_hz')} must be > 0, got {chunk['control_hz']!r}")
    _int(_section(manifest, "denoising", path), "steps", path, "denoising.steps")
    _section(manifest, "language", path)
    dim = _int(_section(manifest, "action", path), "dim", path, "action.dim")
    _validate_safety(manifest, dim, path)


def _validate_safety(manifest: dict, dim: int, path) -> None:
    safety = _section(manifest, "safety", path)
    low = _numbers(safety.get("action_low"), dim, path, "safety.action_low")
    high = _numbers(safety.get("action_high"), dim, path, "safety.action_high")
    bad = [i for i in range(dim) if low[i] > high[i]]
    if bad:
        i = bad[0]
        raise BundleError(f"{_where(path, 'safety')}: action_low[{i}]={low[i]} > action_high[{i}]={high[i]} "
                          "(each bound needs low <= high)")
    if safety.get("max_delta") is not None:
        md = _numbers(safety["max_delta"], dim, path, "safety.max_delta")
        if min(md) <= 0:
            raise BundleError(f"{_where(path, 'safety.max_delta')} must be > 0 per dim (or null), got {md}")
    wd = safety.get("watchdog_timeout_s")
    if wd is not None and _number(wd, path, "safety.watchdog_timeout_s") <= 0:
        raise BundleError(f"{_where(path, 'safety.watchdog_timeout_s')} must be > 0 seconds (or null), got {wd!r}")
    if not isinstance(safety.get("require_timestamp", False), bool):
        raise BundleError(f"{_where(path, 'safety.require_timestamp')} must be true or false, "
                          f"got {safety['require_timestamp']!r}")
    _validate_hold(manifest["action"], safety, dim, low, high, path)


def _validate_hold(action: dict, safety: dict, dim: int, low, high, path) -> None:
    """``action.hold``: per dim "zero" | "last" | a number inside the bounds. Bundles from before it was
    declared carry at most ``safety.hold_action`` (numbers): that is used; without it the old filter would
    re-send the last command on a fault (an arm under delta control keeps moving), so such a bundle is refused."""
    if "hold" not in action:
        if safety.get("hold_action") is None:
            raise BundleError(
                f"{_where(path, 'action.hold')} is missing: this bundle was exported before the hold was declared, "
                "and its safety filter would re-send the last command on a fault (a delta-controlled arm keeps "
                "moving). Re-export it with `vla-rl export` (built-in tasks declare the hold; others: --hold "
                "zero|last per action dim)")
        action["hold"] = safety["hold_action"]
    hold = action["hold"]
    if not isinstance(hold, list) or len(hold) != dim:
        raise BundleError(f"{_where(path, 'action.hold')} must be a list of {dim} entries (action.dim), each one of "
                          f"{list(HOLD_RULES)} or a number, got {hold!r}")
    for i, rule in enumerate(hold):
        value = 0.0 if rule == "zero" else None if rule == "last" else _hold_number(rule, path, i)
        if value is not None and not low[i] <= value <= high[i]:
            raise BundleError(f"{_where(path, f'action.hold[{i}]')}={rule!r} lies outside the safety bounds "
                              f"[{low[i]}, {high[i]}] of that dim")


def _hold_number(rule, path, i: int) -> float:
    if isinstance(rule, str):
        raise BundleError(f"{_where(path, f'action.hold[{i}]')} must be one of {list(HOLD_RULES)} or a number, "
                          f"got {rule!r}")
    return _number(rule, path, f"action.hold[{i}]")
