"""Serve a policy directory with torch, for policies that have no torch-free bundle.

A policy whose observation backbone is a transformers VLM cannot be exported (``vla-rl export`` says why:
its image processor and tokenizer run outside torch). ``vla-rl serve <policy dir>`` then serves the torch
policy itself behind the same websocket protocol, the same control session (action queue or temporal
ensembling, noise stream) and the same safety filter as a bundle, so a robot's client does not change.
The manifest it answers ``hello`` / ``metadata`` with is the one ``vla-rl export`` would write, with
``files`` empty and ``runtime: "torch"``.

This module imports torch and the policy; the bundle runtime (``runtime.py``) stays torch-free.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from .runtime import DEFAULT_MAX_INSTRUCTION_CHARS, PolicyRuntime


class _TorchInputs:
    """What :class:`PolicyRuntime` checks of its graph session (the input names); predict_chunk never runs it."""

    def __init__(self, names):
        self._names = names

    def get_inputs(self):
        return [SimpleNamespace(name=n) for n in self._names]


class TorchPolicyRuntime(PolicyRuntime):
    """``PolicyRuntime`` whose chunks come from ``VLAPolicy.sample`` (same noise layout: [B, K+1, H, A])."""

    def __init__(self, policy, manifest: dict, policy_dir: Path,
                 max_instruction_chars: int = DEFAULT_MAX_INSTRUCTION_CHARS):
        names = ["state", "language", "noise"] + (["rgb"] if policy.cfg.cameras else [])
        super().__init__(policy_dir, manifest, _TorchInputs(names), language=None,
                         max_instruction_chars=max_instruction_chars)
        self.policy = policy.eval()
        self._torch_lock = threading.Lock()  # one sample at a time: the policy (and its feature cache) is shared

    @classmethod
    def load(cls, policy_dir, *, task=None, hold=None, action_bounds=None, control_hz: float | None = None,
             max_delta=None, watchdog_timeout_s: float | None = 0.5, require_timestamp: bool = False,
             device: str = "cpu", max_instruction_chars: int = DEFAULT_MAX_INSTRUCTION_CHARS) -> "TorchPolicyRuntime":
        """Load a ``save_pretrained`` directory. The action bounds, hold and control rate come from ``task``
        (else the training run that wrote the checkpoint) as for ``vla-rl export``; without a known hold the
        serve is refused (a wrong hold moves the robot)."""
        from ..export import _manifest, _vector, action_space
        from ..policy import VLAPolicy

        policy_dir = Path(policy_dir)
        policy = VLAPolicy.from_pretrained(policy_dir, device=device)
        cfg = policy.cfg
        norm = {k: v.tolist() for k, v in policy.normalizer.state_dict().items()}
        space = action_space(cfg.action_dim, task, str(policy_dir), action_bounds, norm, hold, None, None)
        env_hz = space.pop("control_hz")
        control_hz = float(control_hz if control_hz is not None else env_hz or 10.0)
        language = {"kind": "vlm" if policy.vlm is not None else policy.language.kind,
                    "note": "the instruction is read by the torch policy itself"}
        manifest = _manifest(policy, cfg, cfg.noise, policy.noise, False, {}, language, norm, space,
                             _vector(max_delta, cfg.action_dim, "max_delta"), watchdog_timeout_s, require_timestamp,
                             cfg.exec_steps, control_hz, None, None, None, str(policy_dir))
        manifest["runtime"] = "torch"
        return cls(policy, manifest, policy_dir, max_instruction_chars)

    def embed(self, instructions):
        raise NotImplementedError("the torch runtime reads instructions inside the policy; use predict_chunk")

    def predict_chunk(self, state, instructions: list[str], rgb=None, noise=None, rng=None) -> np.ndarray:
        state = np.ascontiguousarray(state, dtype=np.float32)
        b = state.shape[0]
        if noise is None:
            noise = (rng or np.random.default_rng()).standard_normal(self.noise_shape(b), dtype=np.float32)
        device = self.policy.device
        obs = {"state": torch.from_numpy(state).to(device), "instruction": list(instructions)}
        if self.cameras:
            # a copy: images decoded from a request are read-only views of its buffer, which torch may not wrap
            obs["rgb"] = torch.from_numpy(np.array(rgb, dtype=np.uint8)).to(device)
        noise = torch.from_numpy(np.ascontiguousarray(noise, dtype=np.float32)).to(device)
        with self._torch_lock, torch.no_grad():
            return self.policy.sample(obs, noise=noise).actions.float().cpu().numpy()
