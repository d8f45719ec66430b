"""The push services' side, written apart from the crate (Python's cryptography and
http_ece), for the provider tests. One subcommand per job; JSON on stdin and stdout.

web-push      {"ua_private", "auth", "requests": [{"authorization", "body"}]}: verifies each
              VAPID token (RFC 8292), decrypts each body (RFC 8291); prints
              [{"claims", "plaintext"}].
rsa-key       prints a new RSA key: {"private_pem" (PKCS#8), "public_pem"}.
ec-key        prints a new P-256 key, the same way (an APNs .p8 is a PKCS#8 P-256 key).
verify-jwt    {"public_pem", "tokens": [jwt]}: verifies each RS256 or ES256 signature; prints
              [{"header", "claims"}].
tls-cert DIR  writes DIR/ca.pem (a test CA) and DIR/cert.pem and DIR/key.pem (signed by it for
              localhost and 127.0.0.1).
Exits non-zero on a bad signature or a body that does not decrypt."""

import base64
import datetime
import ipaddress
import json
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID


def b64(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_jwt(public, token):
    header, claims, signature = token.split(".")
    head = json.loads(b64(header))
    signed = f"{header}.{claims}".encode()
    raw = b64(signature)
    if head["alg"] == "ES256":
        assert len(raw) == 64, f"ES256 signature of {len(raw)} bytes"
        der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        public.verify(der, signed, ec.ECDSA(hashes.SHA256()))
    elif head["alg"] == "RS256":
        public.verify(raw, signed, padding.PKCS1v15(), hashes.SHA256())
    else:
        raise AssertionError(f"alg {head['alg']!r}")
    return {"header": head, "claims": json.loads(b64(claims))}


def web_push(given):
    private = ec.derive_private_key(int.from_bytes(b64(given["ua_private"]), "big"), ec.SECP256R1())
    out = []
    for request in given["requests"]:
        scheme, _, params = request["authorization"].partition(" ")
        assert scheme == "vapid", f"scheme {scheme!r}"
        fields = dict(p.strip().split("=", 1) for p in params.split(","))
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64(fields["k"]))
        token = verify_jwt(key, fields["t"])
        assert token["header"] == {"typ": "JWT", "alg": "ES256"}, token["header"]
        plaintext = http_ece.decrypt(
            b64(request["body"]),
            private_key=private,
            auth_secret=b64(given["auth"]),
            version="aes128gcm",
        )
        out.append({"claims": token["claims"], "plaintext": plaintext.decode()})
    return out


def new_key(private):
    return {
        "private_pem": private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
        "public_pem": private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode(),
    }


def certificate(subject, issuer, public_key, signing_key, ca):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(signing_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def tls_cert(directory):
    """A test CA (ca.pem, for the client to trust) and a certificate it signed for localhost
    (cert.pem, key.pem, for the server)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    files = {
        "ca.pem": certificate("test CA", "test CA", ca_key.public_key(), ca_key, True),
        "cert.pem": certificate("localhost", "test CA", key.public_key(), ca_key, False),
        "key.pem": new_key(key)["private_pem"].encode(),
    }
    for name, data in files.items():
        with open(f"{directory}/{name}", "wb") as f:
            f.write(data)


command = sys.argv[1]
if command == "web-push":
    import http_ece

    json.dump(web_push(json.load(sys.stdin)), sys.stdout)
elif command == "rsa-key":
    json.dump(new_key(rsa.generate_private_key(public_exponent=65537, key_size=2048)), sys.stdout)
elif command == "ec-key":
    json.dump(new_key(ec.generate_private_key(ec.SECP256R1())), sys.stdout)
elif command == "verify-jwt":
    given = json.load(sys.stdin)
    public = serialization.load_pem_public_key(given["public_pem"].encode())
    json.dump([verify_jwt(public, t) for t in given["tokens"]], sys.stdout)
elif command == "tls-cert":
    tls_cert(sys.argv[2])
else:
    raise SystemExit(f"unknown command {command!r}")
