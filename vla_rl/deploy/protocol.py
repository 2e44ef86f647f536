"""Wire format of the policy server: msgpack maps over websocket binary frames.

Protocol version 1. Every request is a map ``{"type": ..., "id": <optional, echoed>, ...}``:

* ``hello``    ``{"type": "hello", "protocol": 1, "token": str | None, "session": {...}}`` -> ``{"type": "hello",
  "protocol": 1, "server": "vla-rl", "version": ..., "metadata": {...}}``. First message of a connection;
  ``session`` may set ``seed``, ``noise`` ("random"/"zeros"), ``mode`` ("queue"/"ensemble"), ``exec_steps``.
* ``metadata`` -> ``{"type": "metadata", "metadata": {...}}`` (the bundle's manifest minus checksums).
* ``act``      ``{"type": "act", "observation": {...}}`` -> ``{"type": "action", "action": array | None,
  "status": "ok" | "hold", "reasons": [...], "clamped", "rate_limited", "replanned", "step", "latency_s"}``.
* ``reset``    -> ``{"type": "reset", "ok": True}`` (clears this client's queue, noise stream and safety state).
* errors       ``{"type": "error", "code": <one of ERROR_CODES>, "message": str}``; the connection stays
  open except after ``unauthorized``.

numpy arrays travel as ``{"__ndarray__": True, "dtype": "<f4", "shape": [...], "data": bytes}``
(little-endian, C order); only plain numeric/bool dtypes are accepted.
"""

from __future__ import annotations

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
ERROR_CODES = {
    "bad_message": "not a msgpack map, or a field has the wrong type",
    "too_large": "message larger than the server's max_message_bytes",
    "unsupported_protocol": "hello asked for a protocol version this server does not speak",
    "unauthorized": "missing or wrong token (the connection is closed)",
    "not_ready": "a request came before hello",
    "unknown_type": "unknown request type",
    "bad_session": "invalid session options in hello",
    "internal": "the server failed while handling a valid request",
}
_ALLOWED_KINDS = set("biuf")  # bool, int, uint, float


class ProtocolError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def _default(obj):
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _ALLOWED_KINDS:
            raise TypeError(f"cannot send arrays of dtype {obj.dtype}")
        arr = np.ascontiguousarray(obj, dtype=obj.dtype.newbyteorder("<"))
        return {"__ndarray__": True, "dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def _object_hook(obj):
    if obj.get("__ndarray__") is True:
        try:
            dtype = np.dtype(obj["dtype"])
            shape = tuple(int(s) for s in obj["shape"])
            data = obj["data"]
        except Exception as e:
            raise ProtocolError("bad_message", f"malformed array: {e}") from None
        if dtype.kind not in _ALLOWED_KINDS or dtype.hasobject:
            raise ProtocolError("bad_message", f"array dtype {dtype} not allowed")
        if any(s < 0 for s in shape) or not isinstance(data, bytes):
            raise ProtocolError("bad_message", "malformed array shape or data")
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(data):
            raise ProtocolError("bad_message", f"array data has {len(data)} bytes, shape {list(shape)} x {dtype} needs "
                                f"{int(np.prod(shape)) * dtype.itemsize}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    return obj


def pack(message: dict) -> bytes:
    return msgpack.packb(message, default=_default, use_bin_type=True)


def unpack(data) -> dict:
    if isinstance(data, str):
        raise ProtocolError("bad_message", "text frames are not accepted; send msgpack as a binary frame")
    try:
        msg = msgpack.unpackb(data, object_hook=_object_hook, raw=False, strict_map_key=True)
    except ProtocolError:
        raise
    except Exception as e:
        raise ProtocolError("bad_message", f"not valid msgpack: {type(e).__name__}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_message", f"message must be a map, got {type(msg).__name__}")
    if not isinstance(msg.get("type"), str):
        raise ProtocolError("bad_message", "message lacks a string 'type'")
    return msg


def error(code: str, message: str, request_id=None) -> dict:
    return {"type": "error", "code": code, "message": message, "id": request_id}
