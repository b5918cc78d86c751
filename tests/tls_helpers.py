"""Test certificates made with ``cryptography`` (EC P-256: fast): a CA, server and client certificates."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class PKI:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path  # signed by ca, SAN DNS:prometheus.example
    client_key: Path
    other_client_cert: Path  # signed by ca, SAN DNS:intruder.example
    other_client_key: Path
    rogue_cert: Path  # self-signed, not by ca, SAN DNS:prometheus.example
    rogue_key: Path

    def client_ctx(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if cert and key:
            ctx.load_cert_chain(str(cert), str(key))
        return ctx


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def make_cert(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    sans: list[x509.GeneralName],
    *,
    ca: bool = False,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_pki(d: Path) -> PKI:
    """A test CA, a server certificate for localhost/127.0.0.1 and client certificates, in ``d``."""
    files: dict[str, Path] = {}

    def save(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        files[name + "_cert"] = d / f"{name}.crt"
        files[name + "_key"] = d / f"{name}.key"
        files[name + "_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(files[name + "_key"], key)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = make_cert("test CA", ca_key, None, [], ca=True)
    save("ca", ca_cert, ca_key)
    by_ca = (ca_cert.subject, ca_key)
    named: tuple[tuple[str, list[x509.GeneralName]], ...] = (
        ("server", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        ("client", [x509.DNSName("prometheus.example")]),
        ("other", [x509.DNSName("intruder.example")]),
    )
    for name, sans in named:
        k = ec.generate_private_key(ec.SECP256R1())
        save(name, make_cert(name, k, by_ca, sans), k)
    rk = ec.generate_private_key(ec.SECP256R1())
    save("rogue", make_cert("rogue", rk, None, [x509.DNSName("prometheus.example")]), rk)
    return PKI(
        d,
        files["ca_cert"],
        files["server_cert"],
        files["server_key"],
        files["client_cert"],
        files["client_key"],
        files["other_cert"],
        files["other_key"],
        files["rogue_cert"],
        files["rogue_key"],
    )
