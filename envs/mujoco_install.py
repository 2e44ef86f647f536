"""Is the installed MuJoCo whole? mujoco 4 ships as several distributions (``mujoco``, ``mujoco-core``,
``mujoco-studio``) that share the ``mujoco/`` package directory. Installing a task suite that pins mujoco 3.x
downgrades only ``mujoco``: the leftover 4.x parts break ``import mujoco`` (``libmujoco.so.4.0.0: cannot
open shared object file``) while ``pip check`` reports nothing. This module finds that state from the
installed distributions' metadata (cheap, without importing mujoco) and names the one-line fix.
"""

from __future__ import annotations

import warnings
from importlib.metadata import PackageNotFoundError, distribution

SPLIT_PARTS = ("mujoco-core", "mujoco-studio")  # what mujoco >= 4 is split into, beside "mujoco" itself


def _dist(name: str):
    try:
        return distribution(name)
    except PackageNotFoundError:
        return None


def _version(name: str) -> str | None:
    d = _dist(name)
    return None if d is None else d.version


def _root(d) -> str:
    return str(d.locate_file(""))


def fix_command(main: str, parts: dict[str, str]) -> str:
    """The shell line that makes the install whole again, keeping the ``mujoco`` version a suite pinned."""
    if int(main.split(".")[0]) < 4:  # a 3.x wheel is self-contained: the 4.x parts must go
        return f'pip uninstall -y {" ".join(sorted(parts))} mujoco && pip install "mujoco=={main}"'
    pins = " ".join(f'"{name}=={main}"' for name in ("mujoco", *sorted(parts)))
    return f"pip install --force-reinstall --no-deps {pins}"


def install_problem() -> str | None:
    """A one-paragraph diagnosis ending in the fix when ``mujoco`` and its 4.x parts disagree, else None."""
    main_dist = _dist("mujoco")
    if main_dist is None:
        return None
    main = main_dist.version
    # only parts installed into the same directory share (and clobber) its mujoco/ package
    parts = {name: d.version for name in SPLIT_PARTS
             if (d := _dist(name)) is not None and _root(d) == _root(main_dist)}
    if main is None or not parts or all(v == main for v in parts.values()):
        return None
    found = ", ".join(f"{name} {v}" for name, v in sorted(parts.items()))
    return (f"MuJoCo is half-downgraded: mujoco {main} is installed beside {found} (mujoco 4 ships as several "
            f"distributions and installing a package that pins mujoco {main} replaced only one; `import mujoco` "
            f"fails or loads mixed files). Fix: {fix_command(main, parts)}")


def import_mujoco():
    """``import mujoco``, with the diagnosis and the fix in the error when the install is broken."""
    try:
        import mujoco
    except (ImportError, OSError) as e:
        problem = install_problem()
        hint = problem or ("If a package pinned an older mujoco, reinstall one consistent version, e.g. "
                           'pip uninstall -y mujoco-core mujoco-studio mujoco && pip install "mujoco==<version>"')
        raise ImportError(f"import mujoco failed: {e}. {hint}") from e
    return mujoco


def warn_if_broken() -> None:
    problem = install_problem()
    if problem is not None:
        warnings.warn(problem, RuntimeWarning, stacklevel=3)
