"""Demonstration data: one on-disk episode format, its writer, its reader and a torch Dataset.

Format (HDF5, one file per dataset, ``<dir>/demos.hdf5``)::

    /                       attrs: format="vla_rl.demos", version=1, action_dim, state_dim
    /episode_000000/        attrs: instruction (str), success (bool), length (int)
        action              float32 [T, A]   action executed at each step (env units)
        state               float32 [T, S]   proprioception before the action
        privileged          float32 [T, P]   optional, simulator state for critics
        rgb                 uint8   [T, cams, 3, H, W]   optional camera images
    /episode_000001/ ...

A directory may hold several ``*.hdf5`` files; the reader concatenates them in name order.
``DemoDataset`` yields (observation, action chunk) samples: the observation at step t and the
actions t .. t+H-1, padded at the episode end by repeating the last action (the robot holds), with a
mask saying which entries were real.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch

FORMAT = "vla_rl.demos"
VERSION = 1
DEFAULT_FILE = "demos.hdf5"


class DataError(ValueError):
    """A demonstration file is missing, malformed or inconsistent."""


class EpisodeWriter:
    """Append episodes to an HDF5 demo file (written to ``*.tmp`` and renamed on ``close``)."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.suffix != ".hdf5":
            path = path / DEFAULT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._tmp = path.with_suffix(".hdf5.tmp")
        self._file = h5py.File(self._tmp, "w")
        self._file.attrs["format"] = FORMAT
        self._file.attrs["version"] = VERSION
        self.num_episodes = 0

    def add_episode(self, obs: dict, actions, instruction: str, success: bool) -> None:
        actions = np.asarray(actions, dtype=np.float32)
        if actions.ndim != 2 or len(actions) == 0:
            raise DataError(f"actions must be [T, A] with T > 0, got shape {actions.shape}")
        if "state" not in obs:
            raise DataError("episode observations need a 'state' array")
        if not np.isfinite(actions).all():
            raise DataError("episode actions contain NaN/inf")
        attrs = self._file.attrs
        if "action_dim" not in attrs:
            attrs["action_dim"] = actions.shape[1]
            attrs["state_dim"] = np.asarray(obs["state"]).shape[1]
        elif attrs["action_dim"] != actions.shape[1]:
            raise DataError(f"action dim {actions.shape[1]} differs from the file's {attrs['action_dim']}")
        group = self._file.create_group(f"episode_{self.num_episodes:06d}")
        group.attrs["instruction"] = str(instruction)
        group.attrs["success"] = bool(success)
        group.attrs["length"] = len(actions)
        group.create_dataset("action", data=actions)
        for key in ("state", "privileged", "rgb"):
            if key in obs and obs[key] is not None:
                value = np.asarray(obs[key])
                if len(value) != len(actions):
                    raise DataError(f"obs[{key!r}] has {len(value)} steps but actions have {len(actions)}")
                dtype = np.uint8 if key == "rgb" else np.float32
                kwargs = {"compression": "lzf"} if key == "rgb" else {}
                group.create_dataset(key, data=value.astype(dtype), **kwargs)
        self.num_episodes += 1

    def close(self) -> Path:
        self._file.close()
        os.replace(self._tmp, self.path)
        return self.path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:  # a crash leaves no half-written file behind under the real name
            self._file.close()
            self._tmp.unlink(missing_ok=True)


def demo_files(path: str | os.PathLike) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"demo data not found: {path}")
    files = sorted(path.glob("*.hdf5"))
    if not files:
        raise DataError(f"no *.hdf5 demo files in {path}")
    return files


def load_episodes(path: str | os.PathLike, only_success: bool = False) -> list[dict]:
    """All episodes in memory as dicts of numpy arrays plus ``instruction`` and ``success``."""
    episodes = []
    for file in demo_files(path):
        try:
            f = h5py.File(file, "r")
        except OSError as e:
            raise DataError(f"cannot read demo file {file}: {e}") from e
        with f:
            if f.attrs.get("format") != FORMAT:
                raise DataError(f"{file} is not a vla_rl demo file (format attr {f.attrs.get('format')!r})")
            for name in sorted(f.keys()):
                g = f[name]
                ep = {k: g[k][()] for k in g.keys()}
                ep["instruction"] = str(g.attrs["instruction"])
                ep["success"] = bool(g.attrs["success"])
                if only_success and not ep["success"]:
                    continue
                episodes.append(ep)
    if not episodes:
        raise DataError(f"no usable episodes in {path}")
    return episodes


class DemoDataset(torch.utils.data.Dataset):
    """(observation at t, action chunk t..t+horizon-1) samples over all steps of all episodes."""

    def __init__(self, episodes: list[dict], horizon: int, use_rgb: bool = True):
        self.episodes = episodes
        self.horizon = int(horizon)
        self.use_rgb = use_rgb and all("rgb" in ep for ep in episodes)
        self.index = [(e, t) for e, ep in enumerate(episodes) for t in range(len(ep["action"]))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        e, t = self.index[i]
        ep = self.episodes[e]
        actions = ep["action"]
        idx = np.minimum(np.arange(t, t + self.horizon), len(actions) - 1)
        sample = {
            "state": torch.from_numpy(ep["state"][t]),
            "action": torch.from_numpy(actions[idx]),
            "action_mask": torch.from_numpy(np.arange(t, t + self.horizon) < len(actions)),
            "instruction": ep["instruction"],
        }
        if "privileged" in ep:
            sample["privileged"] = torch.from_numpy(ep["privileged"][t])
        if self.use_rgb:
            sample["rgb"] = torch.from_numpy(ep["rgb"][t])
        return sample

    def tensors(self) -> dict:
        """Every sample at once, stacked (``state`` [N, S], ``action`` [N, H, A], ``action_mask`` [N, H],
        ``privileged``/``rgb`` when present, ``instruction`` a list): minibatches are then one index
        operation instead of N Python ``__getitem__`` calls, which dominated the BC step on a small head."""
        e_idx = np.array([e for e, _ in self.index])
        t_idx = np.array([t for _, t in self.index])
        lengths = np.array([len(ep["action"]) for ep in self.episodes])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        flat = lambda key: torch.from_numpy(np.concatenate([ep[key] for ep in self.episodes]))  # noqa: E731
        steps = t_idx[:, None] + np.arange(self.horizon)[None]
        chunk_rows = starts[e_idx][:, None] + np.minimum(steps, lengths[e_idx][:, None] - 1)
        rows = torch.from_numpy(starts[e_idx] + t_idx)
        out = {"state": flat("state")[rows], "action": flat("action")[torch.from_numpy(chunk_rows)],
               "action_mask": torch.from_numpy(steps < lengths[e_idx][:, None]),
               "instruction": [self.episodes[e]["instruction"] for e in e_idx]}
        if all("privileged" in ep for ep in self.episodes):
            out["privileged"] = flat("privileged")[rows]
        if self.use_rgb:
            out["rgb"] = flat("rgb")[rows]
        return out

    def all_actions(self) -> np.ndarray:
        return np.concatenate([ep["action"] for ep in self.episodes])

    def all_states(self) -> np.ndarray:
        return np.concatenate([ep["state"] for ep in self.episodes])


def collate(samples: list[dict]) -> dict:
    """Stack tensors, keep instructions as a list of strings (the policy encodes and caches them)."""
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = values if key == "instruction" else torch.stack(values)
    return out
