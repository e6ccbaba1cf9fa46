"""Test certificates, made with the ``cryptography`` package in a directory of the test's.

:func:`make_certs` writes a CA, a server certificate for ``localhost`` and ``127.0.0.1``, and
client certificates, plus what the tests need to prove the checks work: a server certificate
for another host name (signed by the same CA) and a second, untrusted CA with its own server
and client certificates. Keys are RSA 2048 in PKCS#8 PEM (ZooKeeper's PEM key store reads only
that); ``*-bundle.pem`` files hold a certificate and its key together (ZooKeeper's key store).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Certs", "KeyPair", "make_certs"]

#: The CN of the client certificate: etcd takes it as the user name under --client-cert-auth.
CLIENT_CN = "greenleader"
OTHER_CLIENT_CN = "intruder"


@dataclass(frozen=True)
class KeyPair:
    """A certificate file, its key file, and both in one file (ZooKeeper's PEM key store)."""

    cert: Path
    key: Path
    bundle: Path


@dataclass(frozen=True)
class Certs:
    directory: Path
    ca: Path  #: the CA every server and client trusts
    server: KeyPair  #: localhost, 127.0.0.1, ::1 (also usable as a client: etcd peers)
    client: KeyPair  #: CN=greenleader
    other_client: KeyPair  #: CN=intruder, same CA
    wrong_host: KeyPair  #: a server certificate for wrong.example only, same CA
    rogue_ca: Path  #: a CA nobody trusts
    rogue_server: KeyPair  #: localhost/127.0.0.1, signed by the rogue CA
    rogue_client: KeyPair  #: CN=greenleader, signed by the rogue CA


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "greenleader tests"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))


class _Authority:
    def __init__(self, common_name: str) -> None:
        self.key = _key()
        self.name = _name(common_name)
        builder = _validity(x509.CertificateBuilder())
        self.cert = (
            builder.subject_name(self.name).issuer_name(self.name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, common_name: str, *, hosts: list[str] | None = None, client: bool = True,
              server: bool = False) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
        key = _key()
        usages = [*([ExtendedKeyUsageOID.SERVER_AUTH] if server else []),
                  *([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])]
        builder = (
            _validity(x509.CertificateBuilder())
            .subject_name(_name(common_name)).issuer_name(self.name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_encipherment=True, key_cert_sign=False, crl_sign=False,
                content_commitment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if hosts:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(directory: Path, name: str, issued: tuple[x509.Certificate, rsa.RSAPrivateKey]) -> KeyPair:
    cert, key = issued
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}-key.pem", directory / f"{name}-bundle.pem")
    pair.cert.write_bytes(_pem(cert))
    pair.key.write_bytes(_key_pem(key))
    pair.key.chmod(0o600)
    pair.bundle.write_bytes(_key_pem(key) + _pem(cert))
    pair.bundle.chmod(0o600)
    return pair


def make_certs(directory: Path | str) -> Certs:
    """Write a fresh set of test certificates into ``directory`` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca, rogue = _Authority("greenleader test CA"), _Authority("rogue test CA")
    (directory / "ca.pem").write_bytes(_pem(ca.cert))
    (directory / "rogue-ca.pem").write_bytes(_pem(rogue.cert))
    local = ["localhost", "127.0.0.1", "::1"]
    return Certs(
        directory=directory,
        ca=directory / "ca.pem",
        server=_write(directory, "server", ca.issue("localhost", hosts=local, server=True)),
        client=_write(directory, "client", ca.issue(CLIENT_CN)),
        other_client=_write(directory, "other-client", ca.issue(OTHER_CLIENT_CN)),
        wrong_host=_write(directory, "wrong-host", ca.issue("wrong.example", hosts=["wrong.example"], server=True)),
        rogue_ca=directory / "rogue-ca.pem",
        rogue_server=_write(directory, "rogue-server", rogue.issue("localhost", hosts=local, server=True)),
        rogue_client=_write(directory, "rogue-client", rogue.issue(CLIENT_CN)),
    )
