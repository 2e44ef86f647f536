"""Last line of defence between the policy and the robot (numpy only).

Every control step goes through :meth:`SafetyFilter.filter` (a planned action) or
:meth:`SafetyFilter.hold` (no trustworthy action: bad or stale observation, non-finite output):

* clamp to ``[low, high]`` per action dim;
* limit the change from the previously emitted action to ``max_delta`` per dim and step;
* hold: what holding still means is a declared property of the action space (the bundle manifest's
  ``action.hold``), one rule per action dim: ``"zero"`` (a delta command: no motion), ``"last"`` (an
  absolute command: the last emitted value, e.g. the gripper stays as it is) or a fixed number. End-effector
  delta control holds ``["zero", "zero", "zero", "last"]``: the arm stops, the gripper keeps its command.
  A hold that needs a last value before any was emitted, or no declared hold at all, gives
  ``action=None``: the caller must keep the robot where it is. (Re-sending the last command, the old
  default, would keep a delta-controlled arm moving.)
* watchdog: an observation whose ``timestamp`` is older than ``watchdog_timeout_s`` is stale (as is one
  from more than that far in the future: unsynchronized clocks); with ``require_timestamp`` an
  observation without one is refused too.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Decision:
    """One control step: the action to send (``None``: keep still) and why it is what it is."""

    action: np.ndarray | None
    status: str  # "ok" (policy action, possibly clamped / rate-limited) or "hold"
    reasons: list[str] = field(default_factory=list)
    clamped: bool = False
    rate_limited: bool = False
    replanned: bool = False
    step: int = 0
    latency_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return {
            "action": self.action, "status": self.status, "reasons": list(self.reasons), "clamped": self.clamped,
            "rate_limited": self.rate_limited, "replanned": self.replanned, "step": self.step,
            "latency_s": self.latency_s,
        }


def _vec(x, dim: int, name: str) -> np.ndarray | None:
    if x is None:
        return None
    v = np.asarray(x, dtype=np.float64)
    if v.ndim == 0:
        v = np.full(dim, float(v))
    if v.shape != (dim,):
        raise ValueError(f"safety {name} must be a scalar or have {dim} entries, got shape {list(v.shape)}")
    return v


def _hold_rules(hold, hold_action, dim: int, low: np.ndarray, high: np.ndarray) -> list | None:
    """Per-dim hold rules ("zero" | "last" | float) from ``hold`` (a rule or one per dim) or the legacy
    ``hold_action`` (numbers, clamped to the bounds); None when neither is given."""
    if hold is None:
        if hold_action is None:
            return None
        return np.clip(_vec(hold_action, dim, "hold_action"), low, high).tolist()
    rules = [hold] * dim if isinstance(hold, str) or np.ndim(hold) == 0 else list(hold)
    if len(rules) != dim:
        raise ValueError(f"safety hold must be one rule or {dim} (one per action dim), got {len(rules)}")
    out = []
    for i, r in enumerate(rules):
        if r in ("zero", "last"):
            value = 0.0 if r == "zero" else None
        elif isinstance(r, str):
            raise ValueError(f"safety hold[{i}] must be 'zero', 'last' or a number, got {r!r}")
        else:
            value = float(r)
        if value is not None and not (math.isfinite(value) and low[i] <= value <= high[i]):
            raise ValueError(f"safety hold[{i}]={r!r} must lie inside the bounds [{low[i]}, {high[i]}]")
        out.append(r if r == "last" else value)
    return out


OVERRIDE_KEYS = {"low", "high", "max_delta", "hold", "hold_action", "watchdog_timeout_s", "clock", "require_timestamp"}


class SafetyFilter:
    def __init__(self, low, high, max_delta=None, hold=None, watchdog_timeout_s: float | None = None,
                 clock=time.time, dim: int | None = None, require_timestamp: bool = False, hold_action=None):
        low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
        if dim is None:
            shaped = [np.asarray(v) for v in (low, high, max_delta, hold_action) if v is not None]
            if hold is not None and not isinstance(hold, str):
                shaped.append(np.asarray(hold, dtype=object))
            dim = next((v.shape[0] for v in shaped if v.ndim == 1), None)
        if dim is None:
            raise ValueError("safety bounds: give per-dim low/high, or dim= with scalar bounds")
        low, high = _vec(low, dim, "low"), _vec(high, dim, "high")
        if np.any(low > high) or not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise ValueError("safety bounds must be finite with low <= high")
        self.dim = low.shape[0]
        self.low, self.high = low, high
        self.max_delta = _vec(max_delta, self.dim, "max_delta")
        if self.max_delta is not None and np.any(self.max_delta <= 0):
            raise ValueError("safety max_delta must be > 0")
        self.hold_rules = _hold_rules(hold, hold_action, self.dim, low, high)
        if watchdog_timeout_s is not None and not watchdog_timeout_s > 0:
            raise ValueError("safety watchdog_timeout_s must be > 0 (or None to disable)")
        self.watchdog_timeout_s = watchdog_timeout_s
        self.require_timestamp = bool(require_timestamp)
        self.clock = clock
        self.last: np.ndarray | None = None

    @classmethod
    def from_manifest(cls, manifest: dict, **overrides) -> "SafetyFilter":
        """The filter a bundle declares: ``manifest["safety"]`` limits and the action space's ``hold``
        (validated by :func:`~vla_rl.deploy.bundle.validate_manifest`); ``overrides`` replace any of them."""
        safety = manifest["safety"]
        kw = {
            "low": safety["action_low"], "high": safety["action_high"], "max_delta": safety.get("max_delta"),
            "hold": manifest["action"].get("hold"), "watchdog_timeout_s": safety.get("watchdog_timeout_s"),
            "dim": len(safety["action_low"]), "require_timestamp": safety.get("require_timestamp", False),
        }
        unknown = set(overrides) - OVERRIDE_KEYS
        if unknown:
            raise ValueError(f"unknown safety override(s) {sorted(unknown)}; allowed: {sorted(OVERRIDE_KEYS)}")
        if "hold_action" in overrides:  # the legacy spelling replaces the declared rules
            kw["hold"] = None
        kw.update(overrides)
        return cls(**kw)

    def reset(self) -> None:
        self.last = None

    def stale_reason(self, timestamp) -> str | None:
        """Why an observation taken at ``timestamp`` (seconds, same clock as ``clock``) is too old, or None."""
        if self.watchdog_timeout_s is None:
            return None
        if timestamp is None:
            return "observation has no 'timestamp' (required by the watchdog)" if self.require_timestamp else None
        try:
            ts = float(timestamp)
        except (TypeError, ValueError):
            return f"observation timestamp {timestamp!r} is not a number"
        if not math.isfinite(ts):
            return "observation timestamp is not finite"
        age = self.clock() - ts
        if age > self.watchdog_timeout_s:
            return f"stale observation: {age:.3f}s old > watchdog limit {self.watchdog_timeout_s}s"
        if age < -self.watchdog_timeout_s:
            return f"observation timestamp {-age:.3f}s in the future: clocks out of sync"
        return None

    def filter(self, action: np.ndarray) -> Decision:
        """Clamp and rate-limit a planned action (non-finite -> hold)."""
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (self.dim,) or not np.all(np.isfinite(a)):
            return self.hold("policy produced a non-finite or mis-shaped action")
        reasons = []
        clipped = np.clip(a, self.low, self.high)
        clamped = bool(np.any(clipped != a))
        if clamped:
            reasons.append("clamped to action bounds")
        rate_limited = False
        if self.max_delta is not None and self.last is not None:
            limited = np.clip(clipped, self.last - self.max_delta, self.last + self.max_delta)
            rate_limited = bool(np.any(limited != clipped))
            if rate_limited:
                reasons.append("per-step change limited to max_delta")
            clipped = np.clip(limited, self.low, self.high)
        self.last = clipped
        return Decision(clipped.astype(np.float32), "ok", reasons, clamped=clamped, rate_limited=rate_limited)

    def hold(self, reason: str) -> Decision:
        """The declared hold (see the module docstring); ``action=None`` when it cannot be formed."""
        if self.hold_rules is None:
            return Decision(None, "hold", [reason, "no hold declared for this action space: keep the robot still"])
        if self.last is None and "last" in self.hold_rules:
            return Decision(None, "hold", [reason, "no previous action to hold: keep the robot still"])
        action = np.array([self.last[i] if r == "last" else r for i, r in enumerate(self.hold_rules)])
        self.last = action
        return Decision(action.astype(np.float32), "hold", [reason])
