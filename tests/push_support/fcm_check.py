"""The FCM side of Google's token endpoint, written apart from the crate.

`fcm_check.py key`: prints a new RSA key as {"private_pem" (PKCS#8), "public_pem"}.
`fcm_check.py verify`: reads {"public_pem", "assertions": [jwt]} on stdin, verifies each RS256
signature with the public key, prints the claims. Exits non-zero on a bad signature."""

import base64
import json
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa


def b64(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key():
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    json.dump(
        {
            "private_pem": private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode(),
            "public_pem": private.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode(),
        },
        sys.stdout,
    )


def verify():
    given = json.load(sys.stdin)
    public = serialization.load_pem_public_key(given["public_pem"].encode())
    out = []
    for jwt in given["assertions"]:
        header, claims, signature = jwt.split(".")
        assert json.loads(b64(header)) == {"alg": "RS256", "typ": "JWT"}, b64(header)
        public.verify(
            b64(signature), f"{header}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256()
        )
        out.append(json.loads(b64(claims)))
    json.dump(out, sys.stdout)


{"key": key, "verify": verify}[sys.argv[1]]()
