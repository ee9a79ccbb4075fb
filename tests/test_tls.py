"""
TLS through Twisted's ssl: endpoint (--listen ssl:PORT:privateKey=...:certKey=...),
with a throwaway self-signed certificate made here and a real TLS client
that verifies it.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@pytest.fixture
def certificate(tmp_path):
    """(key path, certificate path) for a self-signed localhost/127.0.0.1 cert."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dache test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = tmp_path / "key.pem", tmp_path / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(key_path), str(cert_path)


def tls_listen(certificate, port: int | str = 0) -> str:
    key, cert = certificate
    return f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"


def https(port: int, cert: str) -> http.client.HTTPSConnection:
    """A client that trusts only the test certificate and checks the host name."""
    context = ssl.create_default_context(cafile=cert)
    return http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)


def test_a_node_serves_https_that_a_verifying_client_accepts(dache_process, certificate):
    node = dache_process(args=[f"--listen={tls_listen(certificate)}"])
    connection = https(node.port, certificate[1])
    connection.request("POST", "/dache/k", body=b'{"value": "over tls"}')
    response = connection.getresponse()
    assert response.status == 204
    response.read()
    assert connection.sock.version() in ("TLSv1.2", "TLSv1.3")
    connection.request("GET", "/dache/k")  # same connection, kept alive
    response = connection.getresponse()
    assert response.status == 200
    assert json.loads(response.read()) == {"key": "k", "value": "over tls"}
    connection.close()


def test_a_tls_port_does_not_answer_plain_http(dache_process, certificate):
    node = dache_process(args=[f"--listen={tls_listen(certificate)}"])
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as plain:
        plain.sendall(b"GET /health HTTP/1.1\r\nHost: dache\r\n\r\n")
        received = b""
        try:
            while chunk := plain.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass
    assert not received.startswith(b"HTTP/")


def test_a_client_that_does_not_trust_the_certificate_is_refused(dache_process, certificate):
    node = dache_process(args=[f"--listen={tls_listen(certificate)}"])
    connection = http.client.HTTPSConnection(
        "127.0.0.1", node.port, context=ssl.create_default_context(), timeout=10
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        connection.request("GET", "/health")
    connection.close()


def test_the_container_healthcheck_follows_a_tls_listen_setting(dache_process, certificate):
    node = dache_process(args=[f"--listen={tls_listen(certificate)}"])
    env = {**os.environ, "LISTEN": tls_listen(certificate, node.port)}
    probe = subprocess.run(
        [sys.executable, "-m", "dache.healthcheck"], env=env, capture_output=True, text=True
    )
    assert probe.returncode == 0, probe.stderr


def test_an_unreadable_key_stops_start_up_with_one_line(dache_process, tmp_path, certificate):
    (tmp_path / "bad.pem").write_text("not a key\n")
    bad = (str(tmp_path / "bad.pem"), certificate[1])
    for listen in [tls_listen(bad), tls_listen((str(tmp_path / "missing.pem"), bad[1]))]:
        node = dache_process(args=[f"--listen={listen}"], wait=False)
        assert node.wait_exit() == 2
        assert "configuration error: --listen/LISTEN is not a valid" in node.output()
        assert "Traceback" not in node.output()
