"""Atomic checkpoint directories: written under a temporary name, then renamed into place.

A crash while saving leaves the previous checkpoint intact, and a crash *between* the two renames of the
swap (old directory aside, new one in) is repaired by :func:`recover_dir` on the next save or load, so
the good checkpoint is never left orphaned. Checkpoints may carry ``checksums.json`` (sha256 of every
file) so that a flipped byte or a truncated file is a named :class:`CheckpointError`, not a silent
wrong resume. Weights are safetensors (never pickle), everything else is JSON or YAML.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

CHECKSUMS_FILE = "checksums.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not match what is asked of it."""


def write_dir_atomically(path: str | os.PathLike, write: Callable[[Path], None], checksums: bool = False) -> Path:
    """Call ``write(tmp_dir)`` and move the finished directory to ``path`` (replacing an old one).
    ``checksums=True`` adds ``checksums.json`` (sha256 of every file written), checked by :func:`verify_checksums`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)  # an earlier crash mid-swap: put its good copy back before replacing anything
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        write(tmp)
        if checksums:
            write_checksums(tmp)
        _fsync_tree(tmp)  # the bytes are on disk before the rename publishes them
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _aside_name(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.old-{pid}")


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace ``path`` by ``tmp``. POSIX has no atomic directory exchange, so the old directory goes aside
    first; if anything stops us before the new one is in place, the aside copy is put back (here, or by
    :func:`recover_dir` after a hard crash)."""
    old = None
    if path.exists():
        old = _aside_name(path, os.getpid())
        os.replace(path, old)
        _fsync_dir(path.parent)
    try:
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: str | os.PathLike) -> Path:
    """Repair what a crash during :func:`write_dir_atomically` left: if ``path`` is missing but an aside copy
    ``.<name>.old-<pid>`` of a dead writer exists, move it back; once ``path`` is whole, delete the leftover
    aside copies and temporary directories of dead writers. Returns ``path``."""
    path = Path(path)
    if not path.parent.is_dir():
        return path
    asides = [p for p in _leftovers(path, "old") if not _writer_alive(p)]
    if not path.exists() and asides:
        newest = max(asides, key=lambda p: p.stat().st_mtime)
        os.replace(newest, path)
        _fsync_dir(path.parent)
    if path.exists():
        for p in asides + [p for p in _leftovers(path, "tmp") if not _writer_alive(p)]:
            if p.exists():
                shutil.rmtree(p, ignore_errors=True)
    return path


def _leftovers(path: Path, kind: str) -> list[Path]:
    return [p for p in path.parent.glob(f".{path.name}.{kind}-*") if p.is_dir()]


def _writer_alive(p: Path) -> bool:
    """Is the process that left ``p`` (pid in its name) still running, i.e. maybe still writing it?"""
    try:
        pid = int(p.name.rsplit(".", 1)[-1].split("-")[1])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False  # our own leftover from an interrupted earlier save
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _fsync_dir(d: Path) -> None:
    """Make a rename durable (the directory entry, not only the file data, must reach the disk)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(root: Path) -> None:
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.name != CHECKSUMS_FILE)
    sums = {f.relative_to(root).as_posix(): sha256_file(f) for f in files}
    (root / CHECKSUMS_FILE).write_text(json.dumps({"sha256": sums}, indent=1))


def verify_checksums(root: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` naming the first file that is missing or whose sha256 differs from
    ``checksums.json``."""
    root = Path(root)
    listed = read_json(root / CHECKSUMS_FILE).get("sha256")
    if not isinstance(listed, dict) or not listed:
        raise CheckpointError(f"{root / CHECKSUMS_FILE} lists no files")
    for rel, want in listed.items():
        f = root / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing (listed in {CHECKSUMS_FILE})")
        if sha256_file(f) != want:
            raise CheckpointError(f"checkpoint file {f} is corrupt: its sha256 differs from {root / CHECKSUMS_FILE} "
                                  "(a truncated copy or a flipped byte)")


def require_files(path: str | os.PathLike, names: list[str]) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return path


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"cannot read {path}: expected a JSON object, got {type(data).__name__}")
    return data
