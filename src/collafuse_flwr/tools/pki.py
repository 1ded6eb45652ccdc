"""The keys and certificates of a Flower deployment: a local certificate authority, the
SuperLink's TLS certificate signed by it, and one authentication key pair per SuperNode.

Flower 1.42 needs, for TLS, the CA certificate, the server certificate and its key on the
SuperLink (`--ssl-ca-certfile`, `--ssl-certfile`, `--ssl-keyfile`) and the CA certificate on
every SuperNode and on the `flwr` CLI (`--root-certificates`, `root-certificates`); the server
certificate must name every address it is reached at (the SuperLink's own SuperExec connects to
127.0.0.1). For SuperNode authentication (`--enable-supernode-auth`), each SuperNode holds an
elliptic-curve private key in OpenSSH format (`--auth-supernode-private-key`) whose public key
was registered beforehand (`flwr supernode register KEY.pub`). Private keys are written with
mode 0600 and never overwritten.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=30)
CURVE = ec.SECP384R1


@dataclass(frozen=True)
class ServerCredentials:
    """The files of the SuperLink's TLS: the CA certificate (also given to every SuperNode
    and to the CLI), the server certificate and the server's private key."""

    ca_certificate: Path
    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's authentication key pair (OpenSSH format)."""

    private_key: Path
    public_key: Path


def write_server_credentials(directory: Path, hosts: list[str]) -> ServerCredentials:
    """A new CA (ca.crt; its key is not kept: nothing else is ever signed) and a server
    certificate (server.crt, server.key) for `hosts` (IP addresses or DNS names), in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(CURVE())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "collafuse-flwr deployment CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(CURVE())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])).issuer_name(ca_name)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    credentials = ServerCredentials(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    _write(credentials.ca_certificate, ca.public_bytes(serialization.Encoding.PEM), private=False)
    _write(credentials.certificate, server.public_bytes(serialization.Encoding.PEM), private=False)
    _write(credentials.private_key, server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), private=True)
    return credentials


def write_node_key(directory: Path) -> NodeKey:
    """A new SuperNode authentication key pair in `directory` (auth, auth.pub: OpenSSH format)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(CURVE())
    pair = NodeKey(directory / "auth", directory / "auth.pub")
    _write(pair.private_key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()), private=True)
    _write(pair.public_key, key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH), private=False)
    return pair


def _usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=not cert_sign, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write a new file (an existing one is an error: keys are never replaced behind a
    deployment's back); private ones readable by their owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
