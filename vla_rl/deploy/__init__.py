"""Deployment runtime for exported bundles: numpy + onnxruntime (+ ``tokenizers`` for MiniLM), never torch.

``PolicyRuntime.load(bundle)`` -> ``act(obs) -> Decision``; ``SafetyFilter``; the websocket policy
server and client live in :mod:`vla_rl.deploy.server`.
"""

from .bundle import BundleError, read_manifest
from .runtime import ControlSession, PolicyRuntime
from .safety import Decision, SafetyFilter

__all__ = ["BundleError", "ControlSession", "Decision", "PolicyRuntime", "SafetyFilter", "read_manifest"]
