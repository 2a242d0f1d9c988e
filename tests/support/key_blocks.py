"""Private key blocks for the data-protection detectors' tests, made at test time (never a key
kept in the repository): a key's PEM header, its first two body lines and its end line, the
shape the `secret` detector must find."""

from __future__ import annotations

from functools import cache

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa


@cache
def key_block(kind: str) -> str:
    """`rsa`: "-----BEGIN RSA PRIVATE KEY-----" (OpenSSL's traditional form); `pkcs8`:
    "-----BEGIN PRIVATE KEY-----". Two body lines kept, as a pasted fragment would be."""
    if kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        form = serialization.PrivateFormat.TraditionalOpenSSL
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        form = serialization.PrivateFormat.PKCS8
    lines = key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption()).decode().splitlines()
    return "\n".join([lines[0], lines[1], lines[2], lines[-1]])
