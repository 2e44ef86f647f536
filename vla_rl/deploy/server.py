"""Policy server (``vla-rl serve <bundle>``) and client: websocket + msgpack, see :mod:`.protocol`.

Each connection is served by its own thread with its own :class:`~.runtime.ControlSession` (action
queue, noise stream, safety state); the graphs are shared and their calls serialized by the runtime's
lock. The server binds to 127.0.0.1 unless told otherwise. A malformed or oversized request gets an
error reply and the connection (and the server) stays up; messages larger than twice
``max_message_bytes`` are refused by the websocket layer itself (close code 1009).

One client cannot stall or exhaust the others:

* until its hello is accepted (token checked) a connection may send only messages of at most
  ``max_hello_bytes``: the websocket layer refuses a larger frame from its header (close 1009), before
  reading or parsing it; only then is the limit raised to ``max_message_bytes``;
* the hello must arrive within ``hello_timeout_s`` of the connection (else close 1008), the opening
  handshake within the same time;
* at most ``max_connections`` connections at once; one more is closed at once (1013, try again later);
* an instruction longer than the runtime's ``max_instruction_chars`` is refused (``too_large``) before
  it reaches the tokenizer; the language encoder runs outside the graph lock; its cache is bounded in bytes;
* after a refused request (malformed, too large) the connection waits ``error_backoff_s`` per started
  MiB before reading on, so that a client flooding large bad messages gets little of the server's CPU
  (a well-behaved client never pays it); at most ``MAX_QUEUE`` messages are buffered per connection.
"""

from __future__ import annotations

import errno
import hmac
import inspect
import logging
import threading
import time
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
DEFAULT_MAX_HELLO_BYTES = 16 << 10  # a hello is a few hundred bytes: token + session options
DEFAULT_HELLO_TIMEOUT_S = 5.0
DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_ERROR_BACKOFF_S = 0.1
MAX_QUEUE = 2  # request/reply protocol: a deeper queue only holds more of a flooding client's data
TOKEN_ENV = "VLA_RL_SERVE_TOKEN"


class ServeError(ValueError):
    """The server cannot start as asked (port in use or out of range, bad limits)."""
_SESSION_KEYS = {"seed", "noise", "mode", "exec_steps", "ensemble_decay"}


def _metadata(runtime: PolicyRuntime) -> dict:
    return {k: v for k, v in runtime.manifest.items() if k != "checksums"}


class PolicyServer:
    """Serve one loaded bundle. ``serve_forever`` blocks; ``start`` runs it in a daemon thread."""

    def __init__(self, bundle_or_runtime, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, session_defaults: dict | None = None,
                 safety: dict | None = None, *, max_hello_bytes: int = DEFAULT_MAX_HELLO_BYTES,
                 hello_timeout_s: float = DEFAULT_HELLO_TIMEOUT_S, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 error_backoff_s: float = DEFAULT_ERROR_BACKOFF_S):
        _check_limits(port, max_message_bytes, max_hello_bytes, hello_timeout_s, max_connections)
        self.runtime = (bundle_or_runtime if isinstance(bundle_or_runtime, PolicyRuntime)
                        else PolicyRuntime.load(bundle_or_runtime))
        self.token = token
        self.max_message_bytes = int(max_message_bytes)
        self.max_hello_bytes = int(max_hello_bytes)
        self.hello_timeout_s = float(hello_timeout_s)
        self.max_connections = int(max_connections)
        self.error_backoff_s = max(0.0, float(error_backoff_s))
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._count_lock = threading.Lock()
        self.active_connections = 0  # connections holding a slot now (for monitoring and tests)
        self.session_defaults = dict(session_defaults or {})
        self.safety = safety
        self._server = _bind(self._handle, host, port, self.max_hello_bytes, self.hello_timeout_s)
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
        if not self._slots.acquire(blocking=False):
            ws.close(1013, f"server at its connection limit ({self.max_connections}); try again later")
            return
        self._count(+1)
        try:
            session = self._greet(ws)
            if session is not None:
                self._serve_session(ws, session)
        except ConnectionClosed:
            pass
        finally:
            self._count(-1)
            self._slots.release()

    def _count(self, delta: int) -> None:
        with self._count_lock:
            self.active_connections += delta

    def _greet(self, ws):
        """Wait for an accepted hello (small messages only, within ``hello_timeout_s``); its session or None."""
        deadline = time.monotonic() + self.hello_timeout_s
        while True:
            try:
                data = ws.recv(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                ws.close(1008, f"no accepted hello within {self.hello_timeout_s:g} s")
                return None
            rid = None
            try:
                msg = unpack(data)
                rid = msg.get("id")
                if msg["type"] != "hello":
                    raise ProtocolError("not_ready", "send hello first")
                session = self._hello(msg)
            except ProtocolError as e:
                ws.send(pack(error(e.code, e.message, rid if _plain(rid) else None)))
                if e.code == "unauthorized":
                    ws.close(1008, "unauthorized")
                    return None
                continue
            # Authenticated: from now on messages may be as large as an observation with images.
            _set_max_size(ws, 2 * self.max_message_bytes + 4096)
            ws.send(pack({"type": "hello", "protocol": PROTOCOL_VERSION, "server": "vla-rl", "version": __version__,
                          "metadata": _metadata(self.runtime), "id": rid if _plain(rid) else None}))
            return session

    def _serve_session(self, ws, session) -> None:
        for data in ws:
            rid = None
            try:
                if len(data) > self.max_message_bytes:
                    raise ProtocolError("too_large", f"message of {len(data)} bytes exceeds max_message_bytes="
                                                     f"{self.max_message_bytes}")
                msg = unpack(data)
                rid = msg.get("id")
                reply, session = self._reply(msg, session)
            except ProtocolError as e:
                ws.send(pack(error(e.code, e.message, rid if _plain(rid) else None)))
                if e.code == "unauthorized":
                    ws.close(1008, "unauthorized")
                    return
                time.sleep(self.error_backoff_s * (1 + len(data) // (1 << 20)))
                continue
            except Exception as e:  # never let one request take the connection or the server down
                log.exception("request failed")
                ws.send(pack(error("internal", f"{type(e).__name__}: {e}", rid if _plain(rid) else None)))
                continue
            reply["id"] = rid if _plain(rid) else None
            ws.send(pack(reply))

    def _reply(self, msg: dict, session):
        kind = msg["type"]
        if kind == "hello":  # a new hello starts a new session (same checks)
            session = self._hello(msg)
            return {"type": "hello", "protocol": PROTOCOL_VERSION, "server": "vla-rl", "version": __version__,
                    "metadata": _metadata(self.runtime)}, session
        if kind == "act":
            obs = msg.get("observation")
            self._check_instruction(obs)
            return {"type": "action", **session.act(obs if obs is not None else {}).to_dict()}, session
        if kind == "reset":
            session.reset()
            return {"type": "reset", "ok": True}, session
        if kind == "metadata":
            return {"type": "metadata", "metadata": _metadata(self.runtime)}, session
        raise ProtocolError("unknown_type", f"unknown request type {kind!r}")

    def _check_instruction(self, obs) -> None:
        """Refuse an oversized instruction here, as a protocol error (backed off), not after tokenizing it."""
        text = obs.get("instruction") if isinstance(obs, dict) else None
        if isinstance(text, (list, tuple)) and len(text) == 1:
            text = text[0]
        limit = self.runtime.max_instruction_chars
        if isinstance(text, str) and len(text) > limit:
            raise ProtocolError("too_large", f"instruction of {len(text)} characters exceeds max_instruction_chars={limit}")

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


def _set_max_size(ws, n: int) -> None:
    """Change the largest message this connection accepts (applies from the next frame)."""
    p = ws.protocol
    if hasattr(p, "max_message_size"):  # websockets >= 15
        p.max_message_size = n
    else:
        p.max_size = n


def _check_limits(port, max_message_bytes, max_hello_bytes, hello_timeout_s, max_connections) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ServeError(f"port must be an integer in 0..65535 (0: any free port), got {port!r}")
    for name, v in (("max_message_bytes", max_message_bytes), ("max_hello_bytes", max_hello_bytes),
                    ("max_connections", max_connections)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ServeError(f"{name} must be an integer >= 1, got {v!r}")
    if not (isinstance(hello_timeout_s, (int, float)) and hello_timeout_s > 0):
        raise ServeError(f"hello_timeout_s must be > 0 seconds, got {hello_timeout_s!r}")


def _bind(handler, host: str, port: int, max_hello_bytes: int, hello_timeout_s: float):
    """The websocket server, accepting only hello-sized messages until a connection authenticates."""
    kw = {"max_queue": MAX_QUEUE} if "max_queue" in inspect.signature(ws_serve).parameters else {}
    try:
        return ws_serve(handler, host, port, max_size=max_hello_bytes, open_timeout=hello_timeout_s,
                        compression=None, **kw)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ServeError(f"port {port} on {host} is already in use (another `vla-rl serve`?); choose another "
                             "--port, or 0 for any free one") from None
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(bundle_dir, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None, **kwargs) -> None:
    """Serve ``bundle_dir`` until interrupted (blocking). ``kwargs`` go to :class:`PolicyServer`."""
    server = PolicyServer(bundle_dir, host, port, token, **kwargs)
    where = server.runtime.bundle_dir
    print(f"vla-rl serve: {where} on {server.url}" + (" (token required)" if token else ""), flush=True)
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
def _one(v):
    return None if v is None else (v[0] if len(v) == 1 else v)


def serve_main(args) -> None:
    import os
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.token is not None:  # argv is world-readable (ps, /proc/<pid>/cmdline)
        print(f"vla-rl serve: warning: --token is visible to every user of this machine in `ps`; set {TOKEN_ENV} "
              "instead", file=sys.stderr, flush=True)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    _check_limits(args.port, args.max_message_bytes, args.max_hello_bytes, args.hello_timeout, args.max_connections)
    path = Path(args.bundle)
    if not (path / "manifest.json").exists() and (path / "config.yaml").exists():
        # A policy directory (e.g. one with a VLM backbone, which has no bundle): serve the torch policy
        # behind the same protocol; this needs torch and the training stack installed.
        try:
            from .torch_runtime import TorchPolicyRuntime
        except ImportError as e:
            raise ServeError(f"{path} is a policy directory, not an exported bundle: serving it needs torch and "
                             f"the training stack ({e}); or export a bundle with `vla-rl export`") from None
        runtime = TorchPolicyRuntime.load(path, task=getattr(args, "task", None),
                                          hold=_one(getattr(args, "hold", None)), device=getattr(args, "device", "cpu"),
                                          max_instruction_chars=args.max_instruction_chars)
    else:
        runtime = PolicyRuntime.load(path, max_instruction_chars=args.max_instruction_chars)
    serve(runtime, args.host, args.port, token, max_message_bytes=args.max_message_bytes,
          session_defaults={"mode": args.mode, "noise": args.noise, "seed": args.seed},
          max_hello_bytes=args.max_hello_bytes, hello_timeout_s=args.hello_timeout, max_connections=args.max_connections)


def main(argv: list[str] | None = None) -> None:
    """``python -m vla_rl.deploy.server <bundle>``: the server without the training stack (no torch)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m vla_rl.deploy.server", description="serve an exported policy bundle")
    add_serve_arguments(parser)
    try:
        serve_main(parser.parse_args(argv))
    except ValueError as e:  # ServeError, BundleError: named, no traceback
        print(f"vla-rl serve: error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
