# -*- test-case-name: haikutx.test.test_tls -*-
"""
The runtime's TLS pair: when no C{--cert}/C{--key} are given, a self-signed
pair is generated once into the state directory and its fingerprint logged.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()


@implementer(IProtocolNegotiationFactory)
class OffersHTTP11:
    """
    A mixin for a protocol factory served over TLS that speaks HTTP/1.1: it
    offers ALPN C{http/1.1}. A factory that offers nothing on an C{ssl:}
    endpoint makes Twisted answer a client's ALPN with an internal-error
    alert (curl and every browser send ALPN); L{twisted.web.server.Site}
    already offers it, so the runtime and the job runner need no mixin.
    """

    def acceptableProtocols(self) -> list[bytes]:
        """
        The protocols offered over ALPN.
        """
        return [b"http/1.1"]


def fingerprint(cert_pem: bytes) -> str:
    """
    The SHA-256 fingerprint of a PEM certificate, as colon-separated hex.
    """
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _local_names(hostname: str) -> list[x509.GeneralName]:
    """
    The names a generated certificate holds: this host's name, C{localhost},
    C{127.0.0.1} and C{::1}, so that a client on this machine can verify it
    whichever of them it connects to.
    """
    names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        names.append(x509.DNSName("localhost"))
    names += [
        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
        x509.IPAddress(ipaddress.IPv6Address("::1")),
    ]
    return names


def ensure_self_signed(cert_path: Path, key_path: Path, hostname: str | None = None) -> str:
    """
    Make sure a certificate and key exist at the given paths, generating a
    self-signed pair (valid ten years) the first time.

    @param cert_path: where the PEM certificate is (or goes).
    @param key_path: where the PEM private key is (or goes); created 0600.
    @param hostname: the certificate's name (default: this host's name).
    @return: the certificate's SHA-256 fingerprint.
    """
    if not (cert_path.exists() and key_path.exists()):
        hostname = hostname or socket.gethostname() or "localhost"
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(
                x509.SubjectAlternativeName(_local_names(hostname)),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_bytes = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(str(key_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_bytes)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        print_ = fingerprint(cert_path.read_bytes())
        log.info(
            "generated a self-signed TLS certificate {cert} with SHA-256 "
            "fingerprint {fingerprint}",
            cert=str(cert_path),
            fingerprint=print_,
        )
        return print_
    print_ = fingerprint(cert_path.read_bytes())
    log.info(
        "TLS certificate {cert} has SHA-256 fingerprint {fingerprint}",
        cert=str(cert_path),
        fingerprint=print_,
    )
    return print_
