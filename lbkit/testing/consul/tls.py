"""HTTPS for :class:`ConsulServer`: its TLS settings, and a throwaway certificate authority for tests.

:func:`make_test_pki` writes a CA, a server certificate for ``localhost`` / ``127.0.0.1`` / ``::1`` (plus
any other names), and a client certificate, all made on the spot (``cryptography`` is needed, a test
dependency of lbkit). Nothing is ever written outside the directory given.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ServerTLS", "TestPKI", "make_test_pki"]


@dataclass(frozen=True)
class ServerTLS:
    """How :class:`ConsulServer` serves HTTPS (as a Consul agent with ``tls.https`` configured)."""

    cert_file: str
    """The server's certificate chain (PEM)."""
    key_file: str
    """Its private key (PEM)."""
    ca_file: str | None = None
    """CA bundle client certificates are verified against (Consul's ``tls.https.ca_file``)."""
    verify_incoming: bool = False
    """Require a client certificate signed by ``ca_file`` (Consul's ``tls.https.verify_incoming``)."""

    def __post_init__(self) -> None:
        for name in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"ServerTLS: {name} {path!r} is not a file")
        if self.verify_incoming and not self.ca_file:
            raise ValueError("ServerTLS: verify_incoming needs ca_file to verify client certificates against")

    def context(self) -> ssl.SSLContext:
        """The server-side SSL context (TLS 1.2 or later)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.ca_file:
            ctx.load_verify_locations(self.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_incoming else ssl.CERT_OPTIONAL
        if not self.ca_file:
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


@dataclass(frozen=True)
class TestPKI:
    """Files written by :func:`make_test_pki` (all PEM)."""

    __test__ = False  # not a pytest test class

    directory: str
    ca_file: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca_file: str
    """A second, unrelated CA: a client trusting only it must fail the handshake."""

    def server_tls(self, *, verify_incoming: bool = True) -> ServerTLS:
        """Settings serving the server certificate, requiring a client certificate by default."""
        return ServerTLS(self.server_cert, self.server_key, self.ca_file, verify_incoming)


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def make_test_pki(directory: str | os.PathLike[str], names: Iterable[str] = ()) -> TestPKI:
    """Write a fresh CA, a server certificate (for localhost, 127.0.0.1, ::1 and ``names``), a client
    certificate and an unrelated second CA into ``directory``; valid for one day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def leaf(
        ca_key: ec.EllipticCurvePrivateKey,
        ca_cert: x509.Certificate,
        cn: str,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = make_ca("lbkit test CA")
    _other_key, other_cert = make_ca("lbkit unrelated CA")
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName("server.dc1.consul"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    server_key, server_cert = leaf(
        ca_key, ca_cert, "server.dc1.consul", sans, ExtendedKeyUsageOID.SERVER_AUTH
    )
    client_key, client_cert = leaf(ca_key, ca_cert, "lbkit client", [], ExtendedKeyUsageOID.CLIENT_AUTH)
    pem = serialization.Encoding.PEM
    return TestPKI(
        directory=str(root),
        ca_file=_write(root / "ca.pem", ca_cert.public_bytes(pem)),
        server_cert=_write(root / "server.pem", server_cert.public_bytes(pem)),
        server_key=_write(root / "server-key.pem", key_pem(server_key)),
        client_cert=_write(root / "client.pem", client_cert.public_bytes(pem)),
        client_key=_write(root / "client-key.pem", key_pem(client_key)),
        other_ca_file=_write(root / "other-ca.pem", other_cert.public_bytes(pem)),
    )
