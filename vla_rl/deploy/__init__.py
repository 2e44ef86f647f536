"""Deployment runtime for exported bundles: numpy + onnxruntime (+ ``tokenizers`` for MiniLM), never torch.

``PolicyRuntime.load(bundle)`` -> ``act(obs) -> Decision``; ``SafetyFilter``; the websocket policy
server and its client (:mod:`vla_rl.deploy.server`): ``PolicyClient(url, token).act(obs)``.
"""

from .bundle import BundleError, read_manifest
from .runtime import ControlSession, PolicyRuntime
from .safety import Decision, SafetyFilter
from .server import PolicyClient, PolicyServer, PolicyServerError, ServeError, start_server_thread

__all__ = ["BundleError", "ControlSession", "Decision", "PolicyClient", "PolicyRuntime", "PolicyServer",
           "PolicyServerError", "SafetyFilter", "ServeError", "read_manifest", "start_server_thread"]
