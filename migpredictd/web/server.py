"""The only HTTP server of migpredictd: ``/``, ``/metrics``, ``/-/healthy``, ``/-/ready``, ``/-/reload``.

Built on the stdlib's ``http.server`` and ``ssl``, with ``bcrypt`` for basic-auth hashes. Its settings
come from ``--web.config.file`` in the format of Prometheus' exporter-toolkit (TLS, client certificates,
basic auth, extra headers, rate limit), read by :mod:`migpredictd.web.webconfig` at start and at every
reload, so operators can reuse the file they give their other exporters.

Why it is built this way:

- one daemon thread per connection and a socket timeout, so a slow or stalled client (slowloris, a TLS
  client that never finishes its handshake) only ever holds its own thread; the TLS handshake runs in that
  thread, never in the accept loop;
- the app methods behind the routes are expected to be fast (pre-rendered metrics): a request never waits
  on a VM;
- bcrypt is slow by design, so a successful check is cached under a keyed hash of the presented
  credentials (as exporter-toolkit does): a scrape every 15 s does not pay ~50-100 ms each time;
- nothing from a Python exception ever reaches a client; errors go to ``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gzip
import hashlib
import hmac
import ipaddress
import itertools
import logging
import secrets
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, Protocol, cast
from urllib.parse import urlsplit

import bcrypt

from migpredictd import __version__
from migpredictd.core.errors import ConfigProblem, InputError, WebConfigError, WebListenError
from migpredictd.web.webconfig import RateLimit, WebConfig, load_web_config

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
# How often the accept loop checks for stop(): stop() returns within this.
SERVE_POLL_SECONDS: Final = 0.05
REALM: Final = "migpredictd"

# Limits on what one request may make us read. The stdlib alone allows 64 KiB per line and 100 header
# lines; a metrics endpoint needs far less.
MAX_REQUEST_LINE: Final = 8192
MAX_HEADER_BYTES: Final = 32 * 1024
MAX_BODY_BYTES: Final = 64 * 1024

# bcrypt of a random password at cost 10: checked for unknown users so that a missing user costs as much
# time as a wrong password (no user enumeration by timing).
_DUMMY_HASH: Final = b"$2b$10$AJHijJkVLgsks7SWI7Zvn.xrqAfiGnifUy01/vZux65SanMi.6/ku"
_AUTH_CACHE_SIZE: Final = 256


class StreamedMetrics(Protocol):
    """A ``/metrics`` body too big to hold whole (10,000 VMs): produced in pieces as it is sent."""

    def chunks(self) -> Iterator[bytes]:
        """The exposition text, piece by piece."""
        ...

    def gzip_chunks(self) -> Iterator[bytes]:
        """The same text as one gzip stream, piece by piece."""
        ...


class WebApp(Protocol):
    """What the server needs from the daemon: all fast, none may wait on a VM."""

    def metrics(self) -> bytes | StreamedMetrics:
        """Prometheus text exposition, already rendered (or rendered pieces, streamed)."""
        ...

    def landing_page(self, query: str) -> str:
        """HTML for ``/``, for the request's query string (sorting, filtering, pages)."""
        ...

    def api(self, path: str) -> tuple[int, bytes]:
        """``/api/v1/...``: (HTTP status, JSON body); unknown paths are 404 with a JSON error."""
        ...

    def healthy(self) -> bool:
        """Liveness: the process works."""
        ...

    def ready(self) -> bool:
        """Readiness: configured and serving."""
        ...

    def reload(self) -> tuple[bool, str]:
        """Reload the daemon's config; ``(ok, message)``."""
        ...


# --------------------------------------------------------------------------------------------------
# Listen address


def parse_listen_address(s: str) -> tuple[str, int]:
    """Parse ``--web.listen-address``: ``:9842`` (all interfaces), ``127.0.0.1:9842``, ``[::1]:9842``.

    :raises InputError: naming the flag, for anything else.
    """

    def bad(why: str) -> InputError:
        return InputError(
            f"{s!r}: {why} (expected HOST:PORT, :PORT or [IPv6]:PORT)", field="--web.listen-address"
        )

    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise bad("unterminated IPv6 address or missing port")
        if ":" not in host:
            raise bad("only IPv6 addresses go in brackets")
        port_s = rest[1:]
    else:
        host, sep, port_s = s.rpartition(":")
        if not sep:
            raise bad("missing port")
        if ":" in host:
            raise bad("IPv6 addresses must be in brackets")
    if not port_s.isdigit() or not port_s.isascii():
        raise bad("port is not a number")
    port = int(port_s)
    if port > 65535:
        raise bad("port out of range 0-65535")
    return host, port


# --------------------------------------------------------------------------------------------------
# Auth and rate limit


class _Authenticator:
    """Basic auth against bcrypt hashes; successes are cached under a keyed hash of the credentials."""

    def __init__(self) -> None:
        self._secret = secrets.token_bytes(32)  # cache keys are useless outside this process
        self._cache: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        # bcrypt is CPU-bound; one at a time so a flood of wrong passwords cannot take both cores.
        self._bcrypt_lock = threading.Lock()
        self.bcrypt_checks = 0  # for tests and debugging: how many times bcrypt actually ran

    def check(self, users: Mapping[bytes, bytes], authorization: str | None) -> bool:
        """Whether the ``Authorization`` header names a configured user with the right password."""
        if not authorization:
            return False
        scheme, _, encoded = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        if not sep:
            return False
        hashed = users.get(user)
        known = hashed is not None
        hashed = hashed if hashed is not None else _DUMMY_HASH
        # The stored hash is part of the key, so changing a password invalidates its cache entry.
        msg = b"".join(len(x).to_bytes(4, "big") + x for x in (user, hashed, password))
        key = hmac.new(self._secret, msg, hashlib.sha256).digest()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return known
        with self._bcrypt_lock:
            self.bcrypt_checks += 1
            try:
                ok = bcrypt.checkpw(password, hashed)  # compares in constant time
            except ValueError:  # bcrypt 5 refuses passwords over 72 bytes; so do we
                ok = False
        if ok and known:
            with self._lock:
                self._cache[key] = None
                if len(self._cache) > _AUTH_CACHE_SIZE:
                    self._cache.popitem(last=False)
        return ok and known


class _TokenBucket:
    """exporter-toolkit's ``rate_limit``: ``burst`` requests at once, refilled one per ``interval``."""

    def __init__(self, limit: RateLimit) -> None:
        self._limit = limit
        self._tokens = float(limit.burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._limit.burst, self._tokens + (now - self._last) / self._limit.interval)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


# --------------------------------------------------------------------------------------------------
# HTTP


def _accepts_gzip(header: str | None) -> bool:
    """Whether ``Accept-Encoding`` allows gzip (``gzip``, ``gzip;q=0.5``, ``*``; not ``gzip;q=0``)."""
    if not header:
        return False
    star = False
    for part in header.split(","):
        coding, _, params = part.strip().partition(";")
        q = 1.0
        for p in params.split(";"):
            name, _, value = p.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        coding = coding.strip().lower()
        if coding in ("gzip", "x-gzip"):
            return q > 0
        if coding == "*":
            star = q > 0
    return star


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with TLS in the worker thread, a connection cap and no stderr tracebacks."""

    daemon_threads = True
    block_on_close = False  # stop() must not wait for a stalled client
    allow_reuse_address = True
    # socketserver's default backlog is 5: a burst of connections (or a few stalled ones arriving at
    # once) would overflow it and a scrape's SYN would wait a 1 s retransmit. Go uses SOMAXCONN.
    request_queue_size = socket.SOMAXCONN

    def __init__(
        self,
        addr: tuple[str, int],
        family: socket.AddressFamily,
        *,
        owner: WebServer,
        config: WebConfig,
        request_timeout: float,
        max_connections: int,
    ) -> None:
        self.address_family = family
        self.owner = owner
        self.config = config
        self.limiter = _TokenBucket(config.rate_limit) if config.rate_limit else None
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        # A client trickling a byte just before each socket timeout would hold its thread for ever:
        # each request (and TLS handshake) also has an overall deadline, enforced by reap().
        self.request_deadline = 3 * request_timeout
        self.active: set[socket.socket] = set()
        self.deadlines: dict[socket.socket, float] = {}
        self.active_lock = threading.Lock()
        super().__init__(addr, _Handler, bind_and_activate=False)

    def server_bind(self) -> None:
        # Dual-stack for ":PORT", as Go does; and no reverse DNS (HTTPServer's getfqdn can hang).
        if self.address_family == socket.AF_INET6 and self.server_address[0] in ("", "::"):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        host, port = self.socket.getsockname()[:2]
        self.server_name, self.server_port = host, port

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        ctx = self.config.tls
        if ctx is None:
            return sock, addr
        try:
            # The handshake itself happens in the worker thread (finish_request): a client that stalls
            # it must not stall the accept loop.
            return ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr
        except (OSError, ValueError):
            sock.close()
            raise

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self.active_lock:
            if len(self.active) >= self.max_connections:
                logger.warning(
                    "refusing connection from %s: %d connections open", client_address[0], len(self.active)
                )
                return False
            self.active.add(request)
            return True

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(self.request_timeout)
            self.set_deadline(request)
            try:
                request.do_handshake()
            except (OSError, ValueError) as exc:  # SSLError is an OSError; plain HTTP lands here
                logger.info("TLS handshake with %s failed: %s", client_address[0], exc)
                return
            finally:
                self.set_deadline(request, clear=True)
            if self.config.client_allowed_sans and not _san_allowed(request, self.config.client_allowed_sans):
                logger.warning("client certificate from %s has no allowed SAN: closing", client_address[0])
                return
        super().finish_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.active_lock:
            self.active.discard(request)
            self.deadlines.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The stdlib prints a traceback to stderr; we log, and the client never sees it.
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError | ValueError):  # resets, timeouts, reaped connections: routine
            logger.debug("connection from %s ended: %s", client_address[0], exc)
        else:
            logger.error("error on connection from %s", client_address[0], exc_info=True)

    def set_deadline(self, sock: socket.socket, *, clear: bool = False) -> None:
        with self.active_lock:
            if clear:
                self.deadlines.pop(sock, None)
            elif sock in self.active:
                self.deadlines[sock] = time.monotonic() + self.request_deadline

    def reap(self) -> int:
        """Cut connections whose request or handshake is past its deadline; return how many."""
        now = time.monotonic()
        with self.active_lock:
            late = [sock for sock, deadline in self.deadlines.items() if deadline < now]
            for sock in late:
                del self.deadlines[sock]
        for sock in late:
            logger.info("closing a connection still sending its request after %.0f s", self.request_deadline)
            _cut(sock)
        return len(late)


def _cut(sock: socket.socket) -> None:
    """Wake a worker blocked on ``sock`` by shutting the socket down under it.

    ``socket.socket.shutdown``, not ``SSLSocket``'s: that one would also drop the TLS state another
    thread is using.
    """
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _san_allowed(sock: ssl.SSLSocket, allowed: tuple[str, ...]) -> bool:
    """Whether the verified peer certificate has a SAN (DNS, IP, email, URI) in ``allowed``."""

    def norm(v: str) -> str:
        try:
            return str(ipaddress.ip_address(v.strip()))
        except ValueError:
            return v

    want = {norm(a) for a in allowed}
    cert = sock.getpeercert() or {}
    sans = cast("tuple[tuple[str, str], ...]", cert.get("subjectAltName", ()))
    return any(norm(value) in want for _, value in sans)


class _Handler(BaseHTTPRequestHandler):
    """One connection: auth, rate limit, routes. Never shows a traceback to the client."""

    server: _Server
    raw_requestline: bytes
    protocol_version = "HTTP/1.1"  # keep-alive: Prometheus reuses its scrape connections
    server_version = f"migpredictd/{__version__}"
    sys_version = ""
    error_content_type = "text/plain; charset=utf-8"
    error_message_format = "%(code)d %(message)s\n"
    disable_nagle_algorithm = True

    def version_string(self) -> str:
        return self.server_version  # not the Python version: nobody needs it, attackers like it

    def handle_one_request(self) -> None:
        # The deadline covers waiting for, reading and answering one request; an idle keep-alive
        # connection is cut after it too (clients reconnect).
        self.server.set_deadline(self.connection)
        try:
            super().handle_one_request()
        finally:
            self.server.set_deadline(self.connection, clear=True)

    def setup(self) -> None:
        super().setup()
        # Every read and write may block this long: a stalled client times out and frees its thread.
        self.connection.settimeout(self.server.request_timeout)

    # -- limits ------------------------------------------------------------------------------------
    def parse_request(self) -> bool:
        if len(self.raw_requestline) > MAX_REQUEST_LINE:
            self.command, self.request_version, self.requestline = "", "HTTP/1.0", ""
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            return False
        if not super().parse_request():
            return False
        if sum(len(k) + len(v) + 4 for k, v in self.headers.items()) > MAX_HEADER_BYTES:
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            return False
        return True

    # -- logging: to our logger, never stderr ------------------------------------------------------
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        code = code.value if isinstance(code, HTTPStatus) else code
        logger.debug('%s "%s" %s', self.address_string(), self.requestline, code)

    def log_error(self, format: str, *args: Any) -> None:
        logger.info("%s: " + format, self.address_string(), *args)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s: " + format, self.address_string(), *args)

    def end_headers(self) -> None:
        for name, value in self.server.config.headers.items():
            self.send_header(name, value)
        super().end_headers()

    # -- dispatch ----------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    # Known paths answer 405 (with Allow) to other methods, unknown ones 404, as Go's mux does.
    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        try:
            self._route()
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            raise
        except Exception:
            logger.exception("error serving %s %s", self.command, self.path)
            self.close_connection = True
            if not getattr(self, "_headers_sent", False):
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal server error\n")

    def _send(
        self,
        code: HTTPStatus,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._headers_sent = True
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _drain_body(self) -> bool:
        """Read and drop a request body so the connection can be reused; False if refused."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # we do not parse chunked bodies: do not reuse the stream
            return True
        length = self.headers.get("Content-Length")
        if length is None:
            return True
        if not length.isdigit():
            self.send_error(HTTPStatus.BAD_REQUEST, "bad Content-Length")
            return False
        n = int(length)
        if n > MAX_BODY_BYTES:
            self.send_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            return False
        while n > 0:
            chunk = self.rfile.read(min(n, 16384))
            if not chunk:
                self.close_connection = True
                return False
            n -= len(chunk)
        return True

    def _route(self) -> None:
        srv = self.server
        config = srv.config
        if not self._drain_body():
            return
        if srv.limiter is not None and not srv.limiter.allow():
            self._send(HTTPStatus.TOO_MANY_REQUESTS, b"too many requests\n")
            return
        if config.users and not srv.owner.authenticator.check(
            config.users, self.headers.get("Authorization")
        ):
            logger.info("unauthorized %s %s from %s", self.command, self.path, self.address_string())
            self._send(
                HTTPStatus.UNAUTHORIZED,
                b"unauthorized\n",
                headers={"WWW-Authenticate": f'Basic realm="{REALM}"'},
            )
            return
        path = urlsplit(self.path).path
        route = _ROUTES.get(path)
        if route is None and path.startswith(API_PREFIX):
            route = (_GET, _Handler._api)
        if route is None:
            self._send(HTTPStatus.NOT_FOUND, b"404 page not found\n")
            return
        methods, handler = route
        if self.command not in methods:
            allow = ", ".join(methods)
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", headers={"Allow": allow})
            return
        handler(self, srv.owner.app)

    # -- routes ------------------------------------------------------------------------------------
    def _landing(self, app: WebApp) -> None:
        page = app.landing_page(urlsplit(self.path).query)
        self._send(HTTPStatus.OK, page.encode("utf-8"), "text/html; charset=utf-8")

    def _api(self, app: WebApp) -> None:
        code, body = app.api(urlsplit(self.path).path)
        self._send(HTTPStatus(code), body, "application/json", {"Cache-Control": "no-store"})

    def _metrics(self, app: WebApp) -> None:
        body = app.metrics()
        headers = {"Vary": "Accept-Encoding"}
        gzipped = _accepts_gzip(self.headers.get("Accept-Encoding"))
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        if isinstance(body, bytes):
            if gzipped:
                body = gzip.compress(body, compresslevel=6, mtime=0)
            self._send(HTTPStatus.OK, body, METRICS_CONTENT_TYPE, headers)
            return
        pieces = body.gzip_chunks() if gzipped else body.chunks()
        first = next(pieces, b"")  # a failure to start the body is still a clean 500
        self._stream(first, pieces, headers)

    def _stream(self, first: bytes, rest: Iterator[bytes], headers: Mapping[str, str]) -> None:
        """Send a body of unknown length: chunked on HTTP/1.1, else until the connection closes.

        The body is never held whole, so a scrape of 10,000 VMs costs pieces of memory, not all of it.
        """
        chunked = self.request_version != "HTTP/1.0"
        self._headers_sent = True
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", METRICS_CONTENT_TYPE)
        for name, value in headers.items():
            self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command == "HEAD":
            return
        # An error after this point can only cut the connection: the client sees a truncated body
        # (a failed scrape), never a half body that looks complete.
        close_after, self.close_connection = self.close_connection, True
        for piece in itertools.chain((first,), rest):
            if not piece:
                continue
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.close_connection = close_after

    def _healthy(self, app: WebApp) -> None:
        self._probe(app.healthy())

    def _ready(self, app: WebApp) -> None:
        self._probe(app.ready())

    def _probe(self, ok: bool) -> None:
        if ok:
            self._send(HTTPStatus.OK, b"OK\n")
        else:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"Service Unavailable\n")

    def _reload(self, app: WebApp) -> None:
        ok, message = app.reload()
        body = (message.rstrip("\n") + "\n").encode("utf-8", "replace")
        self._send(HTTPStatus.OK if ok else HTTPStatus.INTERNAL_SERVER_ERROR, body)


_GET: Final = ("GET", "HEAD")
API_PREFIX: Final = "/api/"
_ROUTES: Final[Mapping[str, tuple[tuple[str, ...], Callable[[_Handler, WebApp], None]]]] = {
    "/": (_GET, _Handler._landing),
    "/metrics": (_GET, _Handler._metrics),
    "/-/healthy": (_GET, _Handler._healthy),
    "/-/ready": (_GET, _Handler._ready),
    "/-/reload": (("POST",), _Handler._reload),
}


# --------------------------------------------------------------------------------------------------
# Public server


class WebServer:
    """Serves a :class:`WebApp` over HTTP(S) in background daemon threads.

    The web config is read once, at :meth:`start`; :meth:`reload_web_config` re-reads it on demand
    (new certificates, users, headers) without dropping the listening socket.
    """

    def __init__(
        self,
        app: WebApp,
        listen: str = ":9842",
        web_config_file: str | None = None,
        *,
        request_timeout: float = 10.0,
        max_connections: int = 256,
    ) -> None:
        """:raises InputError: if ``listen`` does not parse (names ``--web.listen-address``)."""
        self.app = app
        self.authenticator = _Authenticator()
        self._listen = parse_listen_address(listen)
        self._web_config_file = web_config_file
        self._request_timeout = request_timeout
        self._max_connections = max_connections
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._reaper: threading.Thread | None = None
        self._stopping = threading.Event()

    def _reap(self) -> None:
        httpd = self._httpd
        tick = min(0.5, self._request_timeout / 4)
        while httpd is not None and not self._stopping.wait(tick):
            httpd.reap()

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)`` once started (port 0 becomes the real one); else the requested one."""
        if self._httpd is None:
            return self._listen
        host, port = self._httpd.socket.getsockname()[:2]
        return str(host), int(port)

    @property
    def tls(self) -> bool:
        """Whether this server speaks HTTPS."""
        return self._httpd is not None and self._httpd.config.tls is not None

    def _load(self) -> WebConfig:
        return load_web_config(self._web_config_file) if self._web_config_file else WebConfig()

    def start(self) -> None:
        """Read the web config, bind, and serve in a daemon thread.

        :raises WebConfigError: the web config file has problems (each names the file and the key).
        :raises WebListenError: the address cannot be bound.
        """
        if self._httpd is not None:
            raise RuntimeError("WebServer already started")
        config = self._load()
        host, port = self._listen
        try:
            if host == "":
                dual = socket.has_dualstack_ipv6()
                family, sockaddr = (
                    (socket.AF_INET6, ("::", port)) if dual else (socket.AF_INET, ("0.0.0.0", port))
                )
            else:
                infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
                infos.sort(key=lambda i: i[0] != socket.AF_INET)  # "localhost" -> 127.0.0.1 first, as Go
                family, sockaddr = infos[0][0], (str(infos[0][4][0]), port)
            httpd = _Server(
                sockaddr,
                family,
                owner=self,
                config=config,
                request_timeout=self._request_timeout,
                max_connections=self._max_connections,
            )
        except OSError as exc:
            raise WebListenError(f"--web.listen-address {host}:{port}: {exc}") from exc
        try:
            httpd.server_bind()
            httpd.server_activate()
        except OSError as exc:
            httpd.server_close()
            raise WebListenError(f"--web.listen-address {host}:{port}: cannot listen: {exc}") from exc
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": SERVE_POLL_SECONDS},
            name="migpredictd-web",
            daemon=True,
        )
        self._thread.start()
        self._stopping.clear()
        self._reaper = threading.Thread(target=self._reap, name="migpredictd-web-reaper", daemon=True)
        self._reaper.start()
        bound = self.address
        logger.info(
            "listening on %s:%d (%s%s)",
            bound[0],
            bound[1],
            "TLS" if config.tls else "plain HTTP",
            ", basic auth" if config.users else "",
        )

    def reload_web_config(self) -> None:
        """Re-read the web config and use it for new requests and connections; keep the old one on error.

        :raises WebConfigError: the file has problems, or would switch TLS on or off (restart for that).
        """
        httpd = self._httpd
        if httpd is None:
            raise RuntimeError("WebServer not started")
        config = self._load()
        if (config.tls is None) != (httpd.config.tls is None):
            file = self._web_config_file or ""
            raise WebConfigError(
                [ConfigProblem(file, None, "tls_server_config", "turning TLS on or off needs a restart")]
            )
        httpd.limiter = _TokenBucket(config.rate_limit) if config.rate_limit else None
        httpd.config = config  # one reference swap: each request sees the old or the new config, whole

    def stop(self, timeout: float = 3.0) -> None:
        """Stop accepting, close open connections, and wait up to ``timeout`` s for the serve thread."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        self._stopping.set()
        stopper = threading.Thread(target=httpd.shutdown, daemon=True)
        stopper.start()
        stopper.join(timeout)
        httpd.server_close()
        with httpd.active_lock:
            conns = list(httpd.active)
        for sock in conns:
            _cut(sock)
        thread.join(max(0.0, timeout))
        if self._reaper is not None:
            self._reaper.join(timeout)
        self._httpd = None
        self._thread = None
