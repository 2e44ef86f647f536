"""Issue 15 part 4: a MuJoCo install half-downgraded by a suite that pins mujoco 3.x is detected at import and
named with its one-line fix. Simulated with real files: a mujoco package whose import fails the way the broken
install does, and the dist-info a pinned 3.x install leaves, first on sys.path."""

import sys
import warnings

import pytest

from vla_rl.envs import mujoco_install


def _half_downgraded(tmp_path, monkeypatch, version="3.3.0"):
    pkg = tmp_path / "mujoco"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        'raise ImportError("libmujoco.so.4.0.0: cannot open shared object file: No such file or directory")\n')
    for name, v in (("mujoco", version), ("mujoco_core", "4.0.0"), ("mujoco_studio", "4.0.0")):
        info = tmp_path / f"{name}-{v}.dist-info"  # the pinned 3.x beside the 4.x parts it did not replace
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {v}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mujoco", raising=False)


def test_consistent_install_has_no_problem(tmp_path, monkeypatch):
    assert mujoco_install.install_problem() is None  # this venv: mujoco and its parts at one version
    # a whole mujoco 3.x in another directory first on the path (no 4.x parts beside it) is not broken
    info = tmp_path / "mujoco-3.3.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mujoco\nVersion: 3.3.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert mujoco_install.install_problem() is None


def test_half_downgraded_import_names_the_fix(tmp_path, monkeypatch):
    _half_downgraded(tmp_path, monkeypatch)
    problem = mujoco_install.install_problem()
    assert "mujoco 3.3.0" in problem and "mujoco-core" in problem
    with pytest.raises(ImportError) as e:
        mujoco_install.import_mujoco()
    msg = str(e.value)
    assert "libmujoco.so.4.0.0" in msg
    assert 'pip uninstall -y mujoco-core mujoco-studio mujoco && pip install "mujoco==3.3.0"' in msg
    with warnings.catch_warnings(record=True) as caught:  # what `import vla_rl.envs` prints
        warnings.simplefilter("always")
        mujoco_install.warn_if_broken()
    assert any("Fix: pip uninstall" in str(w.message) for w in caught)


def test_fix_for_a_4x_mismatch():
    assert mujoco_install.fix_command("4.1.0", {"mujoco-core": "4.0.0"}) == (
        'pip install --force-reinstall --no-deps "mujoco==4.1.0" "mujoco-core==4.1.0"')
