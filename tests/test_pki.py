"""The deployment's keys and certificates: a CA that verifies the SuperLink's certificate for
its addresses, OpenSSH node keys Flower can read, private files for the owner only."""

from __future__ import annotations

import ipaddress
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from collafuse_flwr.tools.pki import write_node_key, write_server_credentials


def test_the_ca_verifies_the_server_certificate_for_its_addresses(tmp_path):
    creds = write_server_credentials(tmp_path, ["127.0.0.1", "localhost"])
    ca = x509.load_pem_x509_certificate(creds.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(creds.certificate.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # what a TLS server and a client of it load: the pair matches, the CA is a trust anchor
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(creds.certificate, creds.private_key)
    ssl.create_default_context(cafile=str(creds.ca_certificate))
    assert stat.S_IMODE(creds.private_key.stat().st_mode) == 0o600


def test_node_keys_are_openssh_ec_pairs_readable_by_their_owner_only(tmp_path):
    pair = write_node_key(tmp_path / "node-0")
    private = load_ssh_private_key(pair.private_key.read_bytes(), password=None)
    public = load_ssh_public_key(pair.public_key.read_bytes())
    assert private.public_key().public_numbers() == public.public_numbers()
    assert pair.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert stat.S_IMODE(pair.private_key.stat().st_mode) == 0o600
    assert write_node_key(tmp_path / "node-1").public_key.read_bytes() != pair.public_key.read_bytes()


def test_existing_keys_are_never_overwritten(tmp_path):
    pair = write_node_key(tmp_path)
    before = pair.private_key.read_bytes()
    with pytest.raises(FileExistsError):
        write_node_key(tmp_path)
    assert pair.private_key.read_bytes() == before
