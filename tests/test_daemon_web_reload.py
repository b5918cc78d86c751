"""The running daemon reloads its web config with its config: certificates rotate without a restart.

A real `migpredictd run` process serves real TLS on 127.0.0.1. The certificate files are replaced and the
daemon is sent SIGHUP (or `POST /-/reload`); new connections must then get the new certificate, while a bad
web config keeps the old one and marks the reload failed. Shutdown is bounded.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.daemon_helpers import DaemonProcess, free_port
from tests.tls_helpers import PKI, make_cert, make_pki, write_key

pytestmark = pytest.mark.timeout(120)


def _issue(pki: PKI, name: str, cert: Path, key: Path) -> None:
    """A server certificate named ``name`` for 127.0.0.1, signed by the test CA, written atomically."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    ca_key = serialization.load_pem_private_key((pki.dir / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    k = ec.generate_private_key(ec.SECP256R1())
    c = make_cert(name, k, (ca_cert.subject, ca_key), [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    new_key, new_cert = key.with_name(key.name + ".new"), cert.with_name(cert.name + ".new")
    write_key(new_key, k)
    new_cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    os.replace(new_key, key)
    os.replace(new_cert, cert)


def _served_name(port: int, pki: PKI) -> str:
    """The common name of the certificate a fresh TLS connection gets (verified against the test CA)."""
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return str(
        x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    )


def _get(port: int, pki: PKI, path: str, method: str = "GET") -> tuple[int, str]:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", port, context=ssl.create_default_context(cafile=str(pki.ca)), timeout=10
    )
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:g}s: {what}")


def _reload_ok(port: int, pki: PKI) -> float:
    _, body = _get(port, pki, "/metrics")
    line = next(x for x in body.splitlines() if x.startswith("migpredictd_config_last_reload_successful "))
    return float(line.split()[1])


def test_certificates_rotate_on_sighup_and_a_bad_web_config_keeps_the_old(tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    _issue(pki, "server-one", cert, key)
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n")
    config = tmp_path / "config.yaml"
    config.write_text("targets: []\n")
    port = free_port()
    daemon = DaemonProcess(config, port, f"--web.config.file={web}")
    try:
        _wait(lambda: _served_name(port, pki) == "server-one", "the daemon serves the first certificate")
        assert _reload_ok(port, pki) == 1.0

        # Rotation: new files at the same paths, then SIGHUP (what systemctl reload sends).
        _issue(pki, "server-two", cert, key)
        assert _served_name(port, pki) == "server-one"  # nothing changes before the reload
        daemon.proc.send_signal(signal.SIGHUP)
        _wait(lambda: _served_name(port, pki) == "server-two", "SIGHUP makes new connections get the new one")
        assert _reload_ok(port, pki) == 1.0

        # A broken web config: the reload reports it, the daemon keeps serving the last good certificate.
        web.write_text(f"tls_server_config:\n  cert_file: {tmp_path / 'missing.crt'}\n  key_file: {key}\n")
        status, message = _get(port, pki, "/-/reload", method="POST")
        assert status == 500
        assert "web config not reloaded" in message
        assert "missing.crt" in message
        assert _served_name(port, pki) == "server-two"
        assert _reload_ok(port, pki) == 0.0

        # Fixed again through POST /-/reload, with a third certificate.
        _issue(pki, "server-three", cert, key)
        web.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n")
        status, message = _get(port, pki, "/-/reload", method="POST")
        assert (status, "web config reloaded" in message) == (200, True)
        assert _served_name(port, pki) == "server-three"
        assert _reload_ok(port, pki) == 1.0

        # Shutdown is bounded: SIGTERM, exit 0, within the grace periods and start-up noise.
        started = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(15) == 0
        assert time.monotonic() - started < 6.0
        assert "stopped" in daemon.logs()
    finally:
        daemon.stop()
