"""Signing keys and bearer tokens minted at test time (nothing secret is in the repository).

`Issuer` holds an RSA and an EC key pair, writes their public JWKS, and mints tokens:
valid ones and every kind of bad one a client or an attacker might send.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ISSUER = "https://idp.test"
AUDIENCE = "agent-service"


def _private_pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@dataclass
class Issuer:
    """A tiny identity provider: keys, a JWKS document and tokens."""

    rsa_key: Any = field(default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048))
    ec_key: Any = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    issuer: str = ISSUER
    audience: str = AUDIENCE

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, key, alg in (("rsa-1", self.rsa_key, "RS256"), ("ec-1", self.ec_key, "ES256")):
            jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
        return {"keys": keys}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def token(
        self,
        sub: str = "alice",
        alg: str = "RS256",
        kid: str | None = None,
        expires_in: float = 300,
        not_before_in: float = 0,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "sub": sub,
            "iss": self.issuer,
            "aud": self.audience,
            "iat": now,
            "nbf": now + int(not_before_in),
            "exp": now + int(expires_in),
            **claims,
        }
        payload = {key: value for key, value in payload.items() if value is not None}
        key = self.rsa_key if alg == "RS256" else self.ec_key
        kid = kid or ("rsa-1" if alg == "RS256" else "ec-1")
        return jwt.encode(payload, _private_pem(key), algorithm=alg, headers={"kid": kid})

    def bad_tokens(self) -> dict[str, tuple[str, str]]:
        """Each bad token by name, with a part of the message the service must answer."""
        stranger = Issuer()
        valid = self.token()
        header, payload, signature = valid.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
        forged = base64.urlsafe_b64encode(json.dumps({**claims, "sub": "mallory"}).encode()).rstrip(b"=").decode()
        unsigned_header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
        public_pem = self.rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return {
            "malformed": ("not-a-jwt", "malformed"),
            "expired": (self.token(expires_in=-120), "expired"),
            "not-yet-valid": (self.token(not_before_in=600), "not valid yet"),
            "wrong-issuer": (self.token(iss="https://evil.test"), "another issuer"),
            "wrong-audience": (self.token(aud="someone-else"), "another audience"),
            "alg-none": (f"{unsigned_header}.{payload}.", "'none' are not accepted"),
            "tampered": (f"{header}.{forged}.{signature}", "signature does not verify"),
            "hs256-with-the-public-key": (_hs256(claims, public_pem), "'HS256' are not accepted"),
            "unknown-key": (stranger.token(kid="rsa-9"), "key this service does not know"),
            "other-issuers-key": (stranger.token(), "signature does not verify"),
            "no-subject": (self.token(sub=None), "no 'sub' claim"),
        }


def _hs256(claims: dict[str, Any], secret: bytes) -> str:
    """The classic algorithm confusion: an HMAC token keyed with the RSA public key."""
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT","kid":"rsa-1"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    import hashlib
    import hmac

    signature = hmac.new(secret, header + b"." + body, hashlib.sha256).digest()
    return b".".join([header, body, base64.urlsafe_b64encode(signature).rstrip(b"=")]).decode()
