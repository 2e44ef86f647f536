"""Policy server (``vla-rl serve <bundle>``) and client: websocket + msgpack, see :mod:`.protocol`.

Each connection is served by its own thread with its own :class:`~.runtime.ControlSession` (action
queue, noise stream, safety state); the graphs are shared and their calls serialized by the runtime's
lock. The server binds to 127.0.0.1 unless told otherwise. A malformed or oversized request gets an
error reply and the connection (and the server) stays up; messages larger than twice
``max_message_bytes`` are refused by the websocket layer itself (close code 1009).
"""

from __future__ import annotations

import hmac
import inspect
import logging
import threading
from pathlib import Path

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from websockets.sync.server import serve as ws_serve

from .. import __version__
from .cli import add_serve_arguments  # noqa: F401  (re-exported)
from .protocol import PROTOCOL_VERSION, ProtocolError, error, pack, unpack
from .runtime import PolicyRuntime

log = logging.getLogger("vla_rl.deploy.server")
DEFAULT_PORT = 8765
DEFAULT_MAX_MESSAGE_BYTES = 8 << 20
_SESSION_KEYS = {"seed", "noise", "mode", "exec_steps", "ensemble_decay"}


def _metadata(runtime: PolicyRuntime) -> dict:
    return {k: v for k, v in runtime.manifest.items() if k != "checksums"}


class PolicyServer:
    """Serve one loaded bundle. ``serve_forever`` blocks; ``start`` runs it in a daemon thread."""

    def __init__(self, bundle_or_runtime, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, session_defaults: dict | None = None,
                 safety: dict | None = None):
        self.runtime = (bundle_or_runtime if isinstance(bundle_or_runtime, PolicyRuntime)
                        else PolicyRuntime.load(bundle_or_runtime))
        self.token = token
        self.max_message_bytes = int(max_message_bytes)
        self.session_defaults = dict(session_defaults or {})
        self.safety = safety
        self._server = ws_serve(self._handle, host, port, max_size=2 * self.max_message_bytes + 4096,
                                compression=None)
        self.host, self.port = self._server.socket.getsockname()[:2]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def serve_forever(self) -> None:
        log.info("serving %s on %s", self.runtime.bundle_dir, self.url)
        self._server.serve_forever()

    def start(self) -> "PolicyServer":
        self._thread = threading.Thread(target=self.serve_forever, name="vla-rl-policy-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ one connection
    def _handle(self, ws) -> None:
        session = None
        try:
            for data in ws:
                rid = None
                try:
                    if len(data) > self.max_message_bytes:
                        raise ProtocolError("too_large", f"message of {len(data)} bytes exceeds max_message_bytes="
                                                         f"{self.max_message_bytes}")
                    msg = unpack(data)
                    rid = msg.get("id")
                    kind = msg["type"]
                    if kind == "hello":
                        session = self._hello(msg)
                        reply = {"type": "hello", "protocol": PROTOCOL_VERSION, "server": "vla-rl",
                                 "version": __version__, "metadata": _metadata(self.runtime)}
                    elif session is None:
                        raise ProtocolError("not_ready", "send hello first")
                    elif kind == "act":
                        obs = msg.get("observation")
                        reply = {"type": "action", **session.act(obs if obs is not None else {}).to_dict()}
                    elif kind == "reset":
                        session.reset()
                        reply = {"type": "reset", "ok": True}
                    elif kind == "metadata":
                        reply = {"type": "metadata", "metadata": _metadata(self.runtime)}
                    else:
                        raise ProtocolError("unknown_type", f"unknown request type {kind!r}")
                except ProtocolError as e:
                    ws.send(pack(error(e.code, e.message, rid if _plain(rid) else None)))
                    if e.code == "unauthorized":
                        ws.close(1008, "unauthorized")
                        return
                    continue
                except Exception as e:  # never let one request take the connection or the server down
                    log.exception("request failed")
                    ws.send(pack(error("internal", f"{type(e).__name__}: {e}", rid if _plain(rid) else None)))
                    continue
                reply["id"] = rid if _plain(rid) else None
                ws.send(pack(reply))
        except ConnectionClosed:
            pass

    def _hello(self, msg: dict):
        if msg.get("protocol", PROTOCOL_VERSION) != PROTOCOL_VERSION:
            raise ProtocolError("unsupported_protocol", f"server speaks protocol {PROTOCOL_VERSION}, "
                                                        f"client asked for {msg.get('protocol')!r}")
        if self.token is not None:
            given = msg.get("token")
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), self.token.encode()):
                raise ProtocolError("unauthorized", "missing or wrong token")
        opts = msg.get("session") or {}
        if not isinstance(opts, dict) or set(opts) - _SESSION_KEYS:
            raise ProtocolError("bad_session", f"session options must be a map with keys from {sorted(_SESSION_KEYS)}")
        try:
            return self.runtime.session(**{**self.session_defaults, **opts}, safety=self.safety)
        except (TypeError, ValueError) as e:
            raise ProtocolError("bad_session", str(e)) from None


def _plain(x) -> bool:
    return x is None or isinstance(x, (int, str))


def serve(bundle_dir, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None, **kwargs) -> None:
    """Serve ``bundle_dir`` until interrupted (blocking). ``kwargs`` go to :class:`PolicyServer`."""
    server = PolicyServer(bundle_dir, host, port, token, **kwargs)
    print(f"vla-rl serve: {bundle_dir} on {server.url}" + (" (token required)" if token else ""), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def start_server_thread(bundle_or_runtime, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                        **kwargs) -> PolicyServer:
    """Start a server in a daemon thread (port 0: a free port; see ``.port`` / ``.url``); ``.stop()`` ends it."""
    return PolicyServer(bundle_or_runtime, host, port, token, **kwargs).start()


# ---------------------------------------------------------------------- client
class PolicyServerError(RuntimeError):
    def __init__(self, code: str, message: str):
        super().__init__(f"policy server error {code}: {message}")
        self.code, self.message = code, message


class PolicyClient:
    """Synchronous client. ``PolicyClient(url, token).act(obs) -> {"action", "status", "reasons", ...}``."""

    def __init__(self, url: str, token: str | None = None, *, session: dict | None = None, timeout: float = 10.0,
                 max_size: int = 64 << 20):
        self.timeout = timeout
        kw = {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}  # websockets >= 17
        self.ws = connect(url, open_timeout=timeout, max_size=max_size, compression=None, **kw)
        self._next_id = 0
        try:
            self.server_info = self.request({"type": "hello", "protocol": PROTOCOL_VERSION, "token": token,
                                             "session": session or {}})
        except BaseException:
            self.ws.close()
            raise
        self.metadata = self.server_info["metadata"]

    def request_raw(self, data: bytes) -> dict:
        """Send raw bytes, return the decoded reply (errors are returned, not raised)."""
        self.ws.send(data)
        return unpack(self.ws.recv(timeout=self.timeout))

    def request(self, message: dict) -> dict:
        self._next_id += 1
        reply = self.request_raw(pack({**message, "id": self._next_id}))
        if reply.get("type") == "error":
            raise PolicyServerError(reply.get("code"), reply.get("message"))
        return reply

    def act(self, observation: dict) -> dict:
        return self.request({"type": "act", "observation": observation})

    def reset(self) -> None:
        self.request({"type": "reset"})

    def get_metadata(self) -> dict:
        return self.request({"type": "metadata"})["metadata"]

    def close(self) -> None:
        self.ws.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------- CLI hooks
def serve_main(args) -> None:
    import os

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    token = args.token or os.environ.get("VLA_RL_SERVE_TOKEN")
    serve(Path(args.bundle), args.host, args.port, token, max_message_bytes=args.max_message_bytes,
          session_defaults={"mode": args.mode, "noise": args.noise, "seed": args.seed})


def main(argv: list[str] | None = None) -> None:
    """``python -m vla_rl.deploy.server <bundle>``: the server without the training stack (no torch)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vla_rl.deploy.server", description="serve an exported policy bundle")
    add_serve_arguments(parser)
    serve_main(parser.parse_args(argv))


if __name__ == "__main__":
    main()
