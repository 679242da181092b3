"""``miro demo``: serve the reward-slider page and its JSON API with the standard library.

    miro demo                                   # built-in Shapes model, http://127.0.0.1:7860/
    miro demo --model nicolas-dufour/miro --device cuda --dtype bfloat16 --port 8080

Routes: ``GET /`` (the page), ``GET /api/info`` (model, reward keys, resolution, defaults,
limits), ``POST /api/generate`` (JSON in and out, see :mod:`miro.demo.handlers`). It binds
127.0.0.1 by default; ``--host 0.0.0.0`` exposes it to the network, without authentication.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from miro.demo.handlers import DemoLimits, GenerationQueue, handle_generate, handle_info
from miro.io import is_loopback_host

PAGE = "page.html"
_BUSY = json.dumps({"error": "too many open connections to the demo; retry later", "field": None}).encode()
_TOO_MANY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
             b"Connection: close\r\n\r\n" % len(_BUSY)) + _BUSY


class DemoServer(ThreadingHTTPServer):
    """A threading HTTP server holding one pipeline; generation is serialised by ``lock``."""

    daemon_threads = True  # a hung client never blocks shutdown

    def __init__(self, address, pipe, model_name: str, limits: DemoLimits, quiet: bool = False):
        self.pipe = pipe
        self.model_name = model_name
        self.limits = limits
        self.quiet = quiet
        self.lock = GenerationQueue()
        self.page = resources.files("miro.demo").joinpath(PAGE).read_bytes()
        # ThreadingHTTPServer starts a thread per connection without bound: clients that connect and
        # stay (slow or idle ones, up to the handler's timeout each) must not pile up threads.
        self.slots = threading.BoundedSemaphore(limits.max_connections)
        if ":" in str(address[0]):  # an IPv6 address (as http.server's own --bind does)
            self.address_family = socket.AF_INET6
        super().__init__(address, DemoHandler)
        self.loopback = is_loopback_host(self.server_address[0])

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:  # answered without a thread, in the accept loop: a short write to a fresh socket
                request.sendall(_TOO_MANY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def handle_error(self, request, client_address) -> None:
        # A client that resets or drops its connection mid-request is routine: one line (none
        # under --quiet), not socketserver's traceback. Anything else keeps the traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            if not self.quiet:
                print(f"{client_address[0]} - connection lost: {type(exc).__name__}: {exc}", file=sys.stderr)
            return
        super().handle_error(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        shown = f"[{shown}]" if ":" in shown else shown
        return f"http://{shown}:{port}/"


class DemoHandler(BaseHTTPRequestHandler):
    server: DemoServer
    server_version = "miro-demo"
    protocol_version = "HTTP/1.1"
    # A client that stops sending mid-request must not hold its connection (and thread) forever.
    timeout = 30

    # ------------------------------------------------------------------------------ routes
    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if not self._host_allowed():
            return
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        elif path == "/api/info":
            self._send_json(*handle_info(self.server.pipe, self.server.model_name, self.server.limits,
                                         show_paths=self.server.loopback))
        elif path == "/api/generate":
            self._send_json(405, {"error": "use POST with a JSON body", "field": None}, allow="POST")
        else:
            self._send_json(404, {"error": f"no such path {path!r}; try / or /api/info", "field": None})

    def do_HEAD(self) -> None:  # noqa: N802 - GET's status and headers, no body (_send skips it)
        self.do_GET()

    def _method_not_allowed(self) -> None:
        self.close_connection = True  # a body, if any, is not read
        self._send_json(405, {"error": f"method {self.command} is not supported; use GET (/, /api/info) or "
                                       f"POST (/api/generate)", "field": None}, allow="GET, HEAD, POST")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _method_not_allowed  # noqa: N815

    def do_POST(self) -> None:  # noqa: N802
        if not self._host_allowed():
            return
        path = self.path.split("?", 1)[0]
        if path != "/api/generate":
            self.close_connection = True  # the body is not read: it must not be parsed as the next request
            known = path in ("/", "/index.html", "/api/info")
            self._send_json(405 if known else 404,
                            {"error": f"POST is only for /api/generate, not {path!r}", "field": None},
                            allow="GET, HEAD" if known else None)
            return
        payload = self._read_json()
        if payload is _ERROR:
            return
        try:
            status, body = handle_generate(self.server.pipe, payload, self.server.limits, self.server.lock,
                                           still_wanted=self._client_connected)
        except Exception as e:  # a failing model must not kill the server; the page shows why
            self.log_error("generation failed: %r", e)
            # the exception's text (paths, model details) only to the machine's own user
            why = f"{type(e).__name__}: {e}" if self.server.loopback else "see the server's log"
            status, body = 500, {"error": f"generation failed: {why}", "field": None}
        self._send_json(status, body)

    # ----------------------------------------------------------------------------- helpers
    def _host_allowed(self) -> bool:
        """On a loopback address, only requests addressed to a loopback name (localhost,
        127.0.0.1, [::1]; or no Host header) are served. A web site whose DNS name is re-pointed at
        127.0.0.1 (DNS rebinding) is same-origin for the browser, so the JSON-only rule below would
        not keep its page from starting generations; its requests carry its own name as Host."""
        host = self.headers.get("Host")
        if not self.server.loopback or host is None:
            return True
        try:
            name = urlsplit(f"//{host}").hostname or ""
        except ValueError:  # e.g. an unclosed "[" bracket
            name = ""
        if is_loopback_host(name):
            return True
        self.close_connection = True  # a POST body is not read: it must not be parsed as the next request
        self._send_json(403, {"error": f"Host {host[:100]!r} is not allowed; this server answers "
                                       f"localhost, 127.0.0.1 and [::1] only", "field": None})
        return False

    def _client_connected(self) -> bool:
        """False once the client has closed its end (its socket reads as end-of-file), so that a
        request nobody waits for any more is not generated."""
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return not ready or self.connection.recv(1, socket.MSG_PEEK) != b""
        except OSError:
            return False

    def _read_json(self) -> Any:
        # Until the body is read, an error reply must close the connection: the unread body
        # would otherwise be parsed as the next request.
        closing_before, self.close_connection = self.close_connection, True
        ctype = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        # JSON only: a browser must then send a CORS preflight, which this server never
        # grants, so another web site cannot make a visitor's browser start generations.
        if ctype != "application/json":
            self._send_json(415, {"error": f"Content-Type must be application/json; got {ctype!r}",
                                  "field": None})
            return _ERROR
        length = self.headers.get("Content-Length")
        # ASCII digits only: str.isdigit() also accepts "²", on which int() raises
        if length is None:
            self._send_json(411, {"error": "a Content-Length header is required", "field": None})
            return _ERROR
        if not (length.isascii() and length.isdigit()):
            self._send_json(400, {"error": f"Content-Length {length[:40]!r} is not a byte count (digits only)",
                                  "field": None})
            return _ERROR
        n, limit = int(length), self.server.limits.max_body_bytes
        if n > limit:
            self._send_json(413, {"error": f"request body of {n} bytes; at most {limit} are allowed",
                                  "field": None})
            return _ERROR
        raw = self.rfile.read(n)
        self.close_connection = closing_before
        try:
            return json.loads(raw.decode("utf-8"))
        # ValueError covers JSONDecodeError, bad UTF-8 and integers of over 4,300 digits; RecursionError
        # deeply nested arrays (both fit under the body-size cap).
        except (ValueError, RecursionError) as e:
            self._send_json(400, {"error": f"the request body is not valid UTF-8 JSON: {str(e)[:200]}", "field": None})
            return _ERROR

    def _send_json(self, status: int, body: dict, allow: str | None = None) -> None:
        data = json.dumps(body).encode("utf-8")
        self._send(status, data, "application/json", allow=allow)

    def _send(self, status: int, data: bytes, ctype: str, allow: str | None = None) -> None:
        try:
            self.send_response(int(status))
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            if allow:
                self.send_header("Allow", allow)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client left before its answer: one log line
            self.close_connection = True
            self.log_error("client closed the connection before the reply to %s", self.path)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base-class name)
        if not self.server.quiet:
            super().log_message(format, *args)


_ERROR = object()  # sentinel: an error response was already sent


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def make_server(pipe, host: str = "127.0.0.1", port: int = 7860, model_name: str = "",
                limits: DemoLimits | None = None, quiet: bool = False) -> DemoServer:
    """Bind a :class:`DemoServer` (``port=0`` picks a free port; see ``server.url``)."""
    return DemoServer((host, port), pipe, model_name or str(getattr(pipe, "source", "")),
                      limits or DemoLimits(), quiet=quiet)


def build_parser() -> argparse.ArgumentParser:
    d = DemoLimits()
    p = argparse.ArgumentParser(
        prog="miro demo",
        description="Web demo: generate in the browser with one slider per reward of the model.",
    )
    p.add_argument("--model", default="shapes",
                   help="built-in name (shapes, shapes-untrained), pipeline folder, hub repo id, or "
                        "Lightning .ckpt (default: %(default)s)")
    p.add_argument("--variant", default=None, help="subfolder of the model repo (e.g. miro-no-clip)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s; 0.0.0.0 exposes it without a password)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 (default), or bfloat16 / float16 with --device cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is fastest on an oversubscribed machine)")
    p.add_argument("--max-steps", type=int, default=d.max_steps,
                   help="largest num_inference_steps a request may ask for (default: %(default)s)")
    p.add_argument("--max-images", type=int, default=d.max_images,
                   help="largest num_images_per_prompt a request may ask for (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no request log and no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name, value in (("--threads", args.threads), ("--max-steps", args.max_steps),
                        ("--max-images", args.max_images)):
        if value is not None and value < 1:
            print(f"miro demo: {name} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if not 0 <= args.port <= 65535:
        print(f"miro demo: --port must be in [0, 65535], got {args.port}", file=sys.stderr)
        return 2
    import torch

    from miro.generate_cli import DEFAULT_MODEL, FALLBACK_MODEL, check_device, check_dtype, load_pipeline

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:  # refused at startup: otherwise the server would start and fail every request
        device = check_device(args.device)
        check_dtype(args.dtype, device)
    except ValueError as e:
        print(f"miro demo: {e}", file=sys.stderr)
        return 2
    limits = DemoLimits(max_steps=args.max_steps, max_images=args.max_images)
    try:  # the port first: taken, it is said before minutes of model loading, not after
        server = make_server(None, args.host, args.port, model_name=args.model, limits=limits,
                             quiet=args.quiet)
    except OSError as e:  # port in use, address not available
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"miro demo: cannot listen on {shown}:{args.port}: {e}", file=sys.stderr)
        return 1
    try:
        pipe = load_pipeline(args.model, args.variant, device, args.dtype)
    except (ValueError, OSError) as e:  # bad input (2); unreachable hub, missing cache, unreadable files (1)
        server.server_close()
        print(f"miro demo: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    if args.quiet:
        pipe.set_progress_bar_config(disable=True)
    name = args.model
    if name == DEFAULT_MODEL and pipe.source and Path(pipe.source).name == FALLBACK_MODEL:
        name = f"{FALLBACK_MODEL} (random weights)"  # the page must not claim the trained model
    server.pipe, server.model_name = pipe, name  # requests are served only from here on
    if not server.loopback:
        print(f"miro demo: warning: listening on {args.host}, reachable from other machines; anyone who can "
              f"connect may generate (no authentication); use --host 127.0.0.1 to keep it local",
              file=sys.stderr, flush=True)
    # SIGTERM stops as cleanly as Ctrl-C (serve_forever runs in this, the main, thread).
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"miro demo: {name} ({', '.join(pipe.coherence_keys)}) on {device}", flush=True)
    print(f"miro demo: open {server.url}  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        print("\nmiro demo: stopping", flush=True)
    finally:
        server.server_close()
        if server.lock.locked():
            # A generation is running in a request thread: letting the interpreter shut down under
            # it aborts inside torch ("terminate called without an active exception"), so leave now.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
