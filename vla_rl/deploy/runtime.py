"""Run an exported bundle with numpy + onnxruntime only (never torch).

>>> rt = PolicyRuntime.load("bundle/")                # validates manifest + sha256 of every file
>>> d = rt.act({"state": s, "rgb": img, "instruction": "pick up the red cube", "timestamp": time.time()})
>>> d.action, d.status, d.reasons                     # the action to send, "ok" or "hold", and why

``act`` runs a :class:`ControlSession`: an action queue (execute ``exec_steps`` actions of each chunk,
re-plan when it is empty) or temporal ensembling (re-plan every step and average every chunk's
prediction for the current step with exponential weights, oldest first, as in ACT), followed by the
:class:`~vla_rl.deploy.safety.SafetyFilter`. Independent robots/clients use one session each
(:meth:`PolicyRuntime.session`); they share the loaded graphs, whose calls are serialized by a lock.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .bundle import MANIFEST, POLICY_ONNX, BundleError, read_manifest, validate_manifest
from .language import load_language
from .safety import Decision, SafetyFilter


# Instructions are short sentences; a longer one is refused before it reaches the tokenizer, whose cost
# grows with the text (a 1.5 MB instruction took seconds) while the encoders read at most ~64 tokens.
DEFAULT_MAX_INSTRUCTION_CHARS = 1024


class PolicyRuntime:
    def __init__(self, bundle_dir: Path, manifest: dict, session, language,
                 max_instruction_chars: int = DEFAULT_MAX_INSTRUCTION_CHARS):
        self.bundle_dir = Path(bundle_dir)
        validate_manifest(manifest, self.bundle_dir / MANIFEST)
        try:  # the declared safety limits must form a filter now, not fail in every session
            SafetyFilter.from_manifest(manifest)
        except ValueError as e:
            raise BundleError(f"{self.bundle_dir / MANIFEST}: safety limits: {e}") from None
        self.manifest = manifest
        self._session = session
        self.language = language
        self._lock = threading.Lock()  # serializes the policy graph's runs (the language encoder has its own)
        if max_instruction_chars < 1:
            raise ValueError(f"max_instruction_chars must be >= 1, got {max_instruction_chars}")
        self.max_instruction_chars = int(max_instruction_chars)
        obs, act, chunk, den = manifest["observation"], manifest["action"], manifest["chunking"], manifest["denoising"]
        self.cameras: list[str] = list(obs.get("cameras") or [])
        self.image_size: tuple[int, int] = tuple(obs.get("image_size") or (0, 0))
        self.state_dim: int = int(obs["state_dim"])
        self.action_dim: int = int(act["dim"])
        self.horizon: int = int(chunk["horizon"])
        self.exec_steps: int = int(chunk["exec_steps"])
        self.control_hz: float = float(chunk["control_hz"])
        self.denoising_steps: int = int(den["steps"])
        self.input_names = {i.name for i in session.get_inputs()}
        want = {"state", "language", "noise"} | ({"rgb"} if self.cameras else set())
        if self.input_names != want:
            raise BundleError(f"{POLICY_ONNX} inputs {sorted(self.input_names)} do not match the manifest ({sorted(want)})")
        self._default: ControlSession | None = None

    @classmethod
    def load(cls, bundle_dir, *, verify: bool = True, providers=None, threads: int | None = None,
             max_instruction_chars: int = DEFAULT_MAX_INSTRUCTION_CHARS) -> "PolicyRuntime":
        """Load a bundle written by ``vla_rl.export.export_bundle``; ``verify`` checks every file's sha256.
        Observations whose instruction is longer than ``max_instruction_chars`` are held, not encoded."""
        import onnxruntime as ort

        bundle_dir = Path(bundle_dir)
        manifest = read_manifest(bundle_dir, verify=verify)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(bundle_dir / manifest["files"]["policy"]), opts,
                                           providers=providers or ["CPUExecutionProvider"])
            language = load_language(bundle_dir, manifest, providers)
        except BundleError:
            raise
        except Exception as e:  # onnxruntime raises its own exception types for bad graphs
            raise BundleError(f"bundle {bundle_dir}: cannot load the graphs: {e}") from e
        return cls(bundle_dir, manifest, session, language, max_instruction_chars)

    # ------------------------------------------------------------------ batched inference
    def noise_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.denoising_steps + 1, self.horizon, self.action_dim)

    def embed(self, instructions: list[str]) -> np.ndarray:
        # Outside the graph lock: one client's instruction (new, so tokenized) must not stall the others.
        return self.language(list(instructions))

    def predict_chunk(self, state, instructions: list[str], rgb=None, noise=None, rng=None) -> np.ndarray:
        """Batched action chunks [B, H, A] in env units (no safety filter). ``noise`` [B, K+1, H, A]
        fixes every Gaussian draw; otherwise it is drawn from ``rng`` (a numpy Generator)."""
        state = np.ascontiguousarray(state, dtype=np.float32)
        b = state.shape[0]
        if noise is None:
            noise = (rng or np.random.default_rng()).standard_normal(self.noise_shape(b), dtype=np.float32)
        feeds = {"state": state, "noise": np.ascontiguousarray(noise, dtype=np.float32)}
        if self.cameras:
            feeds["rgb"] = np.ascontiguousarray(rgb, dtype=np.uint8)
        feeds["language"] = self.embed(instructions)
        with self._lock:
            return self._session.run(["actions"], feeds)[0]

    # ------------------------------------------------------------------ control loop
    def session(self, **kwargs) -> "ControlSession":
        """A fresh control session (own queue, noise stream and safety state); see :class:`ControlSession`."""
        return ControlSession(self, **kwargs)

    def act(self, observation: Mapping) -> Decision:
        """One control step of the default session (created on first use)."""
        if self._default is None:
            self._default = self.session()
        return self._default.act(observation)

    def reset(self) -> None:
        if self._default is not None:
            self._default.reset()

    def validate_observation(self, obs) -> tuple[dict | None, str | None]:
        """Parse one robot's observation (unbatched, or a batch of 1) -> (feeds, None) or (None, reason)."""
        if not isinstance(obs, Mapping):
            return None, f"observation must be a mapping, got {type(obs).__name__}"
        if obs.get("state") is None:
            return None, "observation lacks 'state'"
        try:
            state = np.asarray(obs["state"])
        except Exception:
            return None, "observation 'state' is not an array"
        if not np.issubdtype(state.dtype, np.floating):
            return None, f"observation 'state' must be floating point, got dtype {state.dtype}"
        if state.shape not in ((self.state_dim,), (1, self.state_dim)):
            return None, f"observation 'state' must have shape [{self.state_dim}], got {list(state.shape)}"
        if not np.all(np.isfinite(state)):
            return None, "observation 'state' contains NaN/inf"
        parsed = {"state": state.reshape(1, self.state_dim).astype(np.float32)}
        if self.cameras:
            if "rgb" not in obs:
                return None, f"observation lacks 'rgb' (cameras {self.cameras})"
            rgb = obs["rgb"]
            if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8:
                return None, f"observation 'rgb' must be a uint8 array, got {getattr(rgb, 'dtype', type(rgb).__name__)}"
            want = (len(self.cameras), 3, *self.image_size)
            if rgb.shape not in (want, (1, *want)):
                return None, f"observation 'rgb' must have shape {list(want)}, got {list(rgb.shape)}"
            parsed["rgb"] = rgb.reshape(1, *want)
        instr = obs.get("instruction")
        if isinstance(instr, (list, tuple)) and len(instr) == 1:
            instr = instr[0]
        if not isinstance(instr, str):
            return None, "observation 'instruction' must be a string"
        if len(instr) > self.max_instruction_chars:
            return None, (f"observation 'instruction' has {len(instr)} characters, more than "
                          f"max_instruction_chars={self.max_instruction_chars}")
        parsed["instruction"] = [instr]
        return parsed, None


class ControlSession:
    """Per-robot control state: action queue or temporal ensemble, noise stream, safety filter.

    ``noise``: "random" (standard normal from ``np.random.default_rng(seed)``, reproducible) or "zeros"
    (the chain's mean path from x_0 = 0). ``mode``: "queue" or "ensemble" (``ensemble_decay`` m in
    w_i = exp(-m i), i = 0 the oldest chunk). ``safety``: overrides of the manifest's safety limits
    (``low``, ``high``, ``max_delta``, ``hold``, ``watchdog_timeout_s``, ``require_timestamp``, ``clock``).
    """

    def __init__(self, runtime: PolicyRuntime, *, seed: int | None = 0, noise: str = "random", mode: str = "queue",
                 exec_steps: int | None = None, ensemble_decay: float = 0.01, safety: dict | None = None):
        if noise not in ("random", "zeros"):
            raise ValueError(f"noise must be 'random' or 'zeros', got {noise!r}")
        if mode not in ("queue", "ensemble"):
            raise ValueError(f"mode must be 'queue' or 'ensemble', got {mode!r}")
        self.runtime = runtime
        self.seed, self.noise, self.mode = seed, noise, mode
        self.exec_steps = int(exec_steps or runtime.exec_steps)
        if not 1 <= self.exec_steps <= runtime.horizon:
            raise ValueError(f"exec_steps must be in [1, {runtime.horizon}], got {self.exec_steps}")
        self.ensemble_decay = float(ensemble_decay)
        self.safety = SafetyFilter.from_manifest(runtime.manifest, **(safety or {}))
        self.reset()

    def reset(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.queue: deque[np.ndarray] = deque()
        self.chunks: deque[tuple[int, np.ndarray]] = deque()  # (start step, chunk) for ensembling
        self.step = 0
        self.safety.reset()

    def _noise(self) -> np.ndarray:
        shape = self.runtime.noise_shape(1)
        if self.noise == "zeros":
            return np.zeros(shape, np.float32)
        return self.rng.standard_normal(shape, dtype=np.float32)

    def _plan(self, parsed: dict) -> np.ndarray:
        return self.runtime.predict_chunk(parsed["state"], parsed["instruction"], parsed.get("rgb"), self._noise())[0]

    def _hold(self, reason: str, t0: float) -> Decision:
        self.queue.clear()  # never resume a plan made before a fault
        self.chunks.clear()
        d = self.safety.hold(reason)
        d.step, d.latency_s = self.step, time.perf_counter() - t0
        self.step += 1
        return d

    def act(self, observation: Mapping) -> Decision:
        t0 = time.perf_counter()
        parsed, reason = self.runtime.validate_observation(observation)
        if reason is None:
            reason = self.safety.stale_reason(observation.get("timestamp"))
        if reason is not None:
            return self._hold(reason, t0)
        replanned = False
        if self.mode == "queue":
            if not self.queue:
                chunk = self._plan(parsed)
                self.queue.extend(chunk[: self.exec_steps])
                replanned = True
            action = self.queue.popleft()
        else:
            self.chunks.append((self.step, self._plan(parsed)))
            replanned = True
            while self.chunks and self.chunks[0][0] + self.runtime.horizon <= self.step:
                self.chunks.popleft()
            preds = np.stack([c[self.step - s] for s, c in self.chunks])  # oldest first
            w = np.exp(-self.ensemble_decay * np.arange(len(preds)))
            action = (w[:, None] * preds).sum(0) / w.sum()
        if not np.all(np.isfinite(action)):
            return self._hold("policy produced a non-finite action", t0)
        d = self.safety.filter(action)
        d.replanned, d.step, d.latency_s = replanned, self.step, time.perf_counter() - t0
        self.step += 1
        return d
