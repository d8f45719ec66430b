"""The Web Push receiver's side, written apart from the crate: verifies each request's VAPID
token (RFC 8292) and decrypts its body (RFC 8291) with http_ece and cryptography.

Reads JSON on stdin: {"ua_private": b64url, "auth": b64url, "requests": [{"authorization",
"body"}]}. Prints JSON: one {"claims", "plaintext"} per request. Exits non-zero on a bad
signature or a body that does not decrypt."""

import base64
import json
import sys

import http_ece
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature


def b64(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_vapid(authorization):
    scheme, _, params = authorization.partition(" ")
    assert scheme == "vapid", f"scheme {scheme!r}"
    fields = dict(p.strip().split("=", 1) for p in params.split(","))
    token, key = fields["t"], b64(fields["k"])
    header, claims, signature = token.split(".")
    assert json.loads(b64(header)) == {"typ": "JWT", "alg": "ES256"}, b64(header)
    raw = b64(signature)
    assert len(raw) == 64, f"signature of {len(raw)} bytes"
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), key)
    public.verify(der, f"{header}.{claims}".encode(), ec.ECDSA(hashes.SHA256()))
    return json.loads(b64(claims))


def main():
    given = json.load(sys.stdin)
    private = ec.derive_private_key(int.from_bytes(b64(given["ua_private"]), "big"), ec.SECP256R1())
    out = []
    for request in given["requests"]:
        claims = verify_vapid(request["authorization"])
        plaintext = http_ece.decrypt(
            b64(request["body"]),
            private_key=private,
            auth_secret=b64(given["auth"]),
            version="aes128gcm",
        )
        out.append({"claims": claims, "plaintext": plaintext.decode()})
    json.dump(out, sys.stdout)


main()
