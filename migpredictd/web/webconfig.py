"""The web config (``--web.config.file``): Prometheus exporter-toolkit's format, validated into a
:class:`WebConfig`.

TLS (server certificate, client certificates, versions, cipher suites), basic-auth users (bcrypt hashes),
extra response headers and a rate limit; ``docs/web-config.md`` says where it differs from
exporter-toolkit. The file is read with the same YAML loader as the daemon config
(:mod:`migpredictd.config.yamlsource`), so every problem names the file, the line and the key.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from migpredictd.config.yamlsource import Problems, key_lines, plain, read_yaml
from migpredictd.core.errors import ConfigProblem, WebConfigError

__all__ = ["RateLimit", "WebConfig", "load_web_config"]

logger = logging.getLogger(__name__)

_BCRYPT_HASH_RE: Final = re.compile(rb"^\$2[abxy]?\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")

# --------------------------------------------------------------------------------------------------
# Web config (exporter-toolkit format)

_TOP_KEYS: Final = frozenset({"tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"})
_TLS_KEYS: Final = frozenset(
    {
        "cert",
        "key",
        "client_ca",
        "cert_file",
        "key_file",
        "client_auth_type",
        "client_ca_file",
        "client_allowed_sans",
        "min_version",
        "max_version",
        "cipher_suites",
        "prefer_server_cipher_suites",
        "curve_preferences",
    }
)
_HTTP_KEYS: Final = frozenset({"http2", "headers"})
_RATE_KEYS: Final = frozenset({"interval", "burst"})

# Header -> allowed values (empty: any), exactly exporter-toolkit's list.
_EXTRA_HEADERS: Final[Mapping[str, tuple[str, ...]]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}

_TLS_VERSIONS: Final[Mapping[str, ssl.TLSVersion]] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

# Go's names (tls.CipherSuites()) -> OpenSSL's. TLS 1.3 suites map to None: like Go, they cannot be
# restricted, so naming them is accepted and has no effect.
_CIPHERS: Final[Mapping[str, str | None]] = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
}
_CURVES: Final = frozenset({"CurveP256", "CurveP384", "CurveP521", "X25519"})

# Python's ssl can only verify the client certificates it asks for, so the two Go modes that accept any
# certificate unverified have no equivalent (and exporter-toolkit itself calls them insecure).
_CLIENT_AUTH: Final[Mapping[str, ssl.VerifyMode]] = {
    "": ssl.CERT_NONE,
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNSUPPORTED_CLIENT_AUTH: Final = frozenset(
    {"RequestClientCert", "RequireAnyClientCert", "RequireClientCert"}
)

_DURATION_RE: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")  # Go spells µs both ways
_DURATION_UNITS: Final[Mapping[str, float]] = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: one request per ``interval`` seconds, bursts of ``burst``."""

    interval: float
    burst: int


@dataclass(frozen=True, slots=True)
class WebConfig:
    """A validated web config. The default (no file) is plain HTTP, no auth, no extra headers."""

    file: str | None = None
    tls: ssl.SSLContext | None = None
    client_allowed_sans: tuple[str, ...] = ()
    users: Mapping[bytes, bytes] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    rate_limit: RateLimit | None = None


class _Checker:
    """Collects every problem of one file, each located by key path and (when known) line."""

    def __init__(self, file: str, lines: Mapping[str, int]) -> None:
        self.file = file
        self.lines = lines
        self.problems: list[ConfigProblem] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(ConfigProblem(self.file, self.lines.get(key), key, message))

    def mapping(self, value: object, key: str, allowed: frozenset[str] | None) -> dict[str, Any]:
        """The value as a mapping with string keys; unknown keys (when ``allowed``) are problems."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(key, f"must be a mapping, not {type(value).__name__}")
            return {}
        out: dict[str, Any] = {}
        for k, v in value.items():
            sub = f"{key}.{k}" if key else str(k)
            if not isinstance(k, str):
                self.problem(sub, "keys must be strings")
            elif allowed is not None and k not in allowed:
                self.problem(sub, f"unknown key (expected one of: {', '.join(sorted(allowed))})")
            else:
                out[k] = v
        return out

    def string(self, value: object, key: str) -> str:
        if value is None:
            return ""
        if not isinstance(value, str):
            self.problem(key, f"must be a string, not {type(value).__name__}")
            return ""
        return value

    def boolean(self, value: object, key: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problem(key, "must be true or false")
            return default
        return value

    def strings(self, value: object, key: str) -> list[str] | None:
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            self.problem(key, "must be a list of strings")
            return None
        return [str(x) for x in value]


def _parse_duration(value: object) -> float | None:
    """A Go duration (``1s``, ``1m30s``, ``250ms``, ``0``) or an integer of nanoseconds, in seconds."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value * 1e-9
    if not isinstance(value, str):
        return None
    if value == "0":
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(value):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return total if pos == len(value) and pos > 0 else None


def load_web_config(path: str) -> WebConfig:
    """Read and validate a ``--web.config.file``; relative file names are relative to its directory.

    :raises WebConfigError: listing every problem, each naming the file and the key.
    """
    problems = Problems(path)
    root = read_yaml(Path(path), problems)
    if problems.items:
        raise WebConfigError(problems.sorted())
    data: object = plain(root) if root is not None else None
    c = _Checker(path, key_lines(root) if root is not None else {})
    top = c.mapping(data, "", _TOP_KEYS)
    base = Path(path).resolve().parent

    tls, sans = _tls_context(c, c.mapping(top.get("tls_server_config"), "tls_server_config", _TLS_KEYS), base)

    users: dict[bytes, bytes] = {}
    for user, hashed in c.mapping(top.get("basic_auth_users"), "basic_auth_users", None).items():
        key = f"basic_auth_users.{user}"
        h = c.string(hashed, key).encode()
        if not _BCRYPT_HASH_RE.match(h):
            c.problem(key, "is not a bcrypt hash ($2y$10$... as made by htpasswd -nBC 10)")
        users[user.encode()] = h

    http = c.mapping(top.get("http_server_config"), "http_server_config", _HTTP_KEYS)
    c.boolean(http.get("http2"), "http_server_config.http2", True)  # accepted; we only speak HTTP/1.1
    headers: dict[str, str] = {}
    for name, value in c.mapping(http.get("headers"), "http_server_config.headers", None).items():
        key = f"http_server_config.headers.{name}"
        if name not in _EXTRA_HEADERS:
            c.problem(key, f"header cannot be configured (allowed: {', '.join(sorted(_EXTRA_HEADERS))})")
            continue
        v = c.string(value, key)
        allowed = _EXTRA_HEADERS[name]
        if allowed and v not in allowed:
            c.problem(key, f"must be one of {', '.join(allowed)}, not {v!r}")
        elif v and all(0x20 <= ord(ch) < 0x7F for ch in v):
            headers[name] = v
        elif v:
            c.problem(key, "must be printable ASCII on one line")

    rate_limit = None
    rate = c.mapping(top.get("rate_limit"), "rate_limit", _RATE_KEYS)
    if rate:
        interval = _parse_duration(rate.get("interval", 0))
        burst = rate.get("burst", 0)
        if interval is None or interval < 0:
            c.problem("rate_limit.interval", f"is not a duration (1s, 250ms, 1m): {rate.get('interval')!r}")
        elif interval > 0:
            if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
                # Go's limiter with burst 0 refuses every request: surely not what was meant.
                c.problem("rate_limit.burst", "must be an integer >= 1 when rate_limit.interval is set")
            else:
                rate_limit = RateLimit(interval, burst)

    if c.problems:
        raise WebConfigError(c.problems)
    return WebConfig(
        file=path, tls=tls, client_allowed_sans=sans, users=users, headers=headers, rate_limit=rate_limit
    )


def _tls_context(c: _Checker, t: dict[str, Any], base: Path) -> tuple[ssl.SSLContext | None, tuple[str, ...]]:
    """Build the server's SSLContext from ``tls_server_config`` (None when TLS is not configured)."""
    k = "tls_server_config."
    s = {
        name: c.string(t.get(name), k + name) for name in _TLS_KEYS if name in t and isinstance(t[name], str)
    }
    for name in ("cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type", "client_ca_file"):
        if name in t and name not in s:
            c.string(t[name], k + name)  # records the type problem
    enabled = any(s.get(n) for n in ("cert", "key", "cert_file", "key_file", "client_ca", "client_ca_file"))
    enabled = enabled or bool(s.get("client_auth_type"))
    if not enabled:
        if t:
            logger.warning("%s: tls_server_config has no certificate: serving plain HTTP", c.file)
        return None, ()

    def path(name: str) -> str:
        return str(base / s[name]) if s.get(name) else ""

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_alpn_protocols(["http/1.1"])  # no HTTP/2 here: tell clients rather than let them guess

    versions = []
    for name, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        v = c.string(t.get(name), k + name) or default
        if v not in _TLS_VERSIONS:
            c.problem(k + name, f"unknown TLS version {v!r} (expected one of {', '.join(_TLS_VERSIONS)})")
            v = default
        versions.append(_TLS_VERSIONS[v])
    if versions[0] > versions[1]:
        c.problem(k + "min_version", "is above max_version")
    else:
        ctx.minimum_version, ctx.maximum_version = versions

    ciphers = c.strings(t.get("cipher_suites"), k + "cipher_suites")
    if ciphers:
        unknown = [x for x in ciphers if x not in _CIPHERS]
        if unknown:
            c.problem(k + "cipher_suites", f"unknown cipher suite(s) {', '.join(unknown)} (use Go's names)")
        else:
            names = [n for n in (_CIPHERS[x] for x in ciphers) if n]
            if names:
                try:
                    ctx.set_ciphers(":".join(names))
                except ssl.SSLError as exc:
                    c.problem(k + "cipher_suites", f"not available in this OpenSSL: {exc}")
    if c.boolean(t.get("prefer_server_cipher_suites"), k + "prefer_server_cipher_suites", True):
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    curves = c.strings(t.get("curve_preferences"), k + "curve_preferences")
    if curves:
        bad = [x for x in curves if x not in _CURVES]
        if bad:
            c.problem(k + "curve_preferences", f"unknown curve(s) {', '.join(bad)}")
        else:
            logger.warning(
                "%s: tls_server_config.curve_preferences is ignored (OpenSSL's defaults apply)", c.file
            )

    # Server certificate: a file or inline PEM, not both.
    complete = True
    for name in ("cert_file", "key_file"):
        if s.get(name):
            try:
                Path(path(name)).read_bytes()
            except OSError as exc:
                c.problem(k + name, f"cannot read {path(name)}: {exc.strerror}")
                complete = False
            except ValueError as exc:  # a NUL byte in the name: no file can have it
                c.problem(k + name, f"cannot read {path(name)!r}: {exc}")
                complete = False
    for inline, file in (("cert", "cert_file"), ("key", "key_file")):
        if s.get(inline) and s.get(file):
            c.problem(k + file, f"give either {inline} or {file}, not both")
            complete = False
        elif not s.get(inline) and not s.get(file):
            c.problem(k + file, f"missing (one of {inline} or {file} is required for TLS)")
            complete = False
    if complete:
        _load_cert_chain(c, ctx, s, path("cert_file"), path("key_file"))

    auth = s.get("client_auth_type", "")
    if auth in _UNSUPPORTED_CLIENT_AUTH:
        c.problem(
            k + "client_auth_type",
            f"{auth} (certificates unverified) is not supported, use RequireAndVerifyClientCert",
        )
    elif auth not in _CLIENT_AUTH:
        c.problem(
            k + "client_auth_type",
            f"unknown value {auth!r} (expected one of {', '.join(sorted(_CLIENT_AUTH)[1:])})",
        )
    else:
        ctx.verify_mode = _CLIENT_AUTH[auth]
    has_ca = bool(s.get("client_ca") or s.get("client_ca_file"))
    if s.get("client_ca") and s.get("client_ca_file"):
        c.problem(k + "client_ca_file", "give either client_ca or client_ca_file, not both")
    elif has_ca and _CLIENT_AUTH.get(auth) == ssl.CERT_NONE:
        c.problem(k + "client_ca_file", "client CAs are configured without a client_auth_type")
    elif not has_ca and _CLIENT_AUTH.get(auth, ssl.CERT_NONE) != ssl.CERT_NONE:
        # Go would fall back to the system roots: any publicly signed client certificate would pass.
        c.problem(k + "client_ca_file", f"client_auth_type {auth} needs client_ca_file or client_ca")
    elif has_ca:
        try:
            if s.get("client_ca_file"):
                ctx.load_verify_locations(cafile=path("client_ca_file"))
            else:
                ctx.load_verify_locations(cadata=s["client_ca"])
        except (OSError, ValueError, ssl.SSLError) as exc:  # ValueError: a NUL byte in the name
            key = "client_ca_file" if s.get("client_ca_file") else "client_ca"
            c.problem(k + key, f"cannot load CA certificates: {exc}")

    sans = c.strings(t.get("client_allowed_sans"), k + "client_allowed_sans")
    if sans is not None and auth != "RequireAndVerifyClientCert":
        c.problem(k + "client_allowed_sans", "needs client_auth_type RequireAndVerifyClientCert")
    return ctx, tuple(sans or ())


def _load_cert_chain(c: _Checker, ctx: ssl.SSLContext, s: Mapping[str, str], cert: str, key: str) -> None:
    """Load the server certificate and key from files, or from inline PEM via a private temp dir."""
    k = "tls_server_config."
    where = "cert_file" if cert else "cert"
    try:
        with tempfile.TemporaryDirectory(prefix="migpredictd-tls-") as tmp:
            if not cert:
                cert = os.path.join(tmp, "cert.pem")
                Path(cert).write_text(s["cert"], encoding="utf-8")
            if not key:
                key = os.path.join(tmp, "key.pem")
                fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(s["key"])
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        c.problem(k + where, f"cannot load certificate and key: {exc}")
