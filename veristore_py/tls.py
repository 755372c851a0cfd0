"""TLS contexts for the HTTP API: members serve HTTPS, clients verify it (mTLS optional).

- `server_context`: the member's certificate chain and key; with a client CA, every client
  must present a certificate that CA signed (mTLS).
- `client_context`: verification on (the system's CAs, or `ca_file` for a private CA);
  optionally a client certificate for mTLS. There is no switch to turn verification off.

TLS 1.2 is the floor. The Raft channel is not TLS: PySyncObj's own password scheme
authenticates and encrypts it (docs/security.md).
"""

from __future__ import annotations

import ssl


def server_context(cert_file: str, key_file: str, client_ca_file: str | None = None) -> ssl.SSLContext:
    """The context a member serves HTTPS with."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=client_ca_file)
    return context


def client_context(ca_file: str | None = None, cert_file: str | None = None,
                   key_file: str | None = None) -> ssl.SSLContext:
    """The context clients verify members (and gateways, engines) with."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    return context
