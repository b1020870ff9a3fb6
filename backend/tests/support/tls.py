"""A throwaway certificate authority (trustme) for TLS tests: a server cert for loopback, and a CA nobody trusts."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import trustme

SERVER_NAMES = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class TestCA:
    """PEM files of a test CA and a server certificate it issued for `SERVER_NAMES`.

    A client trusts the server through `ca_cert_pem` (as `SSL_CERT_FILE`, or `create_default_context(cafile=...)`);
    `other_ca_cert_pem` is an unrelated CA, for "the server's CA is not trusted" tests.
    """

    __test__: ClassVar[bool] = False  # a name starting with Test is not a pytest test class

    ca_cert_pem: Path
    server_cert_pem: Path
    server_key_pem: Path
    other_ca_cert_pem: Path

    def server_ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.server_cert_pem, self.server_key_pem)
        return context

    def client_ssl_context(self, *, trust_other_ca: bool = False) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.other_ca_cert_pem if trust_other_ca else self.ca_cert_pem)


def make_test_ca(directory: Path) -> TestCA:
    """Write a fresh CA, a server cert and key for 127.0.0.1 and localhost, and an unrelated CA into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert(*SERVER_NAMES)
    test_ca = TestCA(
        ca_cert_pem=directory / "ca.pem",
        server_cert_pem=directory / "server.pem",
        server_key_pem=directory / "server.key",
        other_ca_cert_pem=directory / "other-ca.pem",
    )
    ca.cert_pem.write_to_path(str(test_ca.ca_cert_pem))
    # The leaf first, then any intermediates: what a server presents.
    test_ca.server_cert_pem.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(test_ca.server_key_pem))
    test_ca.server_key_pem.chmod(0o600)
    trustme.CA().cert_pem.write_to_path(str(test_ca.other_ca_cert_pem))
    return test_ca
