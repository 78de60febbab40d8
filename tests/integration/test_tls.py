"""TLS: a balancer with channel credentials reaches servers with a self-signed certificate."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest

import lbkit
import lbkit.aio
from lbkit.testing import ModelServer
from tests.integration.conftest import pb2, pb2_grpc

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def self_signed() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture
def tls_servers():
    cert, key = self_signed()
    creds = grpc.ssl_server_credentials([(key, cert)])
    servers = [ModelServer(credentials=creds).start() for _ in range(2)]
    yield servers, cert
    for s in servers:
        s.stop(0)


def test_tls_sync(tls_servers):
    servers, cert = tls_servers
    creds = grpc.ssl_channel_credentials(root_certificates=cert)
    with lbkit.Balancer([s.address for s in servers], credentials=creds) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        seen = {stub.Predict(pb2.PredictRequest(), timeout=5).served_by for _ in range(4)}
    assert seen == {s.address for s in servers}


async def test_tls_aio(tls_servers):
    servers, cert = tls_servers
    creds = grpc.ssl_channel_credentials(root_certificates=cert)
    async with lbkit.aio.Balancer([s.address for s in servers], credentials=creds) as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        seen = {(await stub.Predict(pb2.PredictRequest(), timeout=5)).served_by for _ in range(4)}
    assert seen == {s.address for s in servers}


def test_tls_with_wrong_root_never_becomes_ready(tls_servers):
    servers, _ = tls_servers
    other_cert, _ = self_signed()
    creds = grpc.ssl_channel_credentials(root_certificates=other_cert)
    with lbkit.Balancer([servers[0].address], credentials=creds) as lb:
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(pb2.PredictRequest(), timeout=0.5)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
