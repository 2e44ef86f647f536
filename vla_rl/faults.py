"""Fault injection for the checkpoint swap: a process that dies (``os._exit``) at a chosen step of
``vla_rl.checkpoint.write_dir_atomically``, so tests and ``benchmarks/reliability_training.py`` can check that
whatever a crash leaves behind is recovered. Not used in training.

    python -m vla_rl.faults CHECKPOINT_DIR STEP [--copy-iteration N]

STEP is one of :data:`STEPS`. Without ``--copy-iteration`` the new checkpoint is a small synthetic one
(``sub/w.bin`` and ``state.json`` = ``{"v": 2}``); with it, a copy of the existing checkpoint whose
``state.json`` says iteration N.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from . import checkpoint

STEPS = ("during_write", "before_aside", "after_aside", "after_swap", "during_cleanup")
EXIT_CODE = 9


def crash_during_swap(path: Path, step: str, copy_iteration: int | None = None) -> None:
    """Run one checkpoint swap of ``path`` and die at ``step`` (the process exits with :data:`EXIT_CODE`)."""
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    renames = {"n": 0}
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def replace(a, b):
        renames["n"] += 1
        if step == "before_aside" and renames["n"] == 1:
            os._exit(EXIT_CODE)
        real_replace(a, b)
        if (step == "after_aside" and renames["n"] == 1) or (step == "after_swap" and renames["n"] == 2):
            os._exit(EXIT_CODE)

    def rmtree(p, ignore_errors=False):
        if step == "during_cleanup" and ".old-" in str(p):
            next(f for f in Path(p).rglob("*") if f.is_file()).unlink()  # half deleted, then the crash
            os._exit(EXIT_CODE)
        real_rmtree(p, ignore_errors=ignore_errors)

    def write(tmp: Path):
        if copy_iteration is None:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "w.bin").write_bytes(b"v2" * 1000)
            (tmp / "state.json").write_text('{"v": 2}')
        else:  # a newer checkpoint of the same run
            real_rmtree(tmp)
            shutil.copytree(path, tmp)
            (tmp / checkpoint.CHECKSUMS_FILE).unlink(missing_ok=True)
            state = json.loads((tmp / "state.json").read_text())
            state["iteration"] = copy_iteration
            (tmp / "state.json").write_text(json.dumps(state))
        if step == "during_write":
            os._exit(EXIT_CODE)

    os.replace, shutil.rmtree = replace, rmtree
    checkpoint.write_dir_atomically(path, write, checksums=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path)
    p.add_argument("step", choices=STEPS)
    p.add_argument("--copy-iteration", type=int, default=None)
    a = p.parse_args()
    crash_during_swap(a.path, a.step, a.copy_iteration)


if __name__ == "__main__":
    main()
