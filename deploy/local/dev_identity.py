#!/usr/bin/env python3
"""A development identity provider in a directory: a signing key, its public JWKS and a bearer token.

    python deploy/local/dev_identity.py DIR [--print-token]

`make up` runs it (DIR: `dev-identity/`, git-ignored) so docker compose runs with auth on and no
secret is ever committed: Envoy and the agent read DIR/jwks.json, `agentctl --token`, curl and the
chat page's Settings use DIR/token. `RUN_AUTH=on make run` does the same under agent-data/.
Idempotent: an existing key is kept; the token is minted again when it is missing, was signed by
another key, or expires within a day. Tokens are RS256, `sub` = `developer`, for ISSUER and AUDIENCE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "agent-grpc-stack-dev"
AUDIENCE = "agent-service"
SUBJECT = "developer"
KEY_ID = "dev-1"
TOKEN_LIFETIME_S = 30 * 24 * 3600
RENEW_BEFORE_S = 24 * 3600


@dataclass(frozen=True)
class DevIdentity:
    """Where the files are."""

    directory: Path

    @property
    def key(self) -> Path:
        return self.directory / "signing-key.pem"

    @property
    def jwks(self) -> Path:
        return self.directory / "jwks.json"

    @property
    def token(self) -> Path:
        return self.directory / "token"


def ensure(directory: Path) -> DevIdentity:
    """The key, JWKS and a valid token in `directory`, made where missing (see the module docstring)."""
    identity = DevIdentity(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if identity.key.exists():
        key = serialization.load_pem_private_key(identity.key.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey), f"{identity.key} is not an RSA key"
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write(identity.key, pem, 0o600)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    _write(
        identity.jwks, json.dumps({"keys": [{**public, "kid": KEY_ID, "alg": "RS256", "use": "sig"}]}).encode(), 0o644
    )
    if not _still_good(identity):
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": SUBJECT, "iat": now, "exp": now + TOKEN_LIFETIME_S}
        token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": KEY_ID})
        _write(identity.token, token.encode() + b"\n", 0o600)
    return identity


def _still_good(identity: DevIdentity) -> bool:
    """The token exists, verifies against the JWKS and lives at least RENEW_BEFORE_S more."""
    if not identity.token.exists():
        return False
    keys = jwt.PyJWKSet.from_json(identity.jwks.read_text())
    try:
        claims = jwt.decode(
            identity.token.read_text().strip(), keys[KEY_ID].key, algorithms=["RS256"], audience=AUDIENCE, issuer=ISSUER
        )
    except (jwt.PyJWTError, KeyError):
        return False
    return int(claims["exp"]) - time.time() > RENEW_BEFORE_S


def _write(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` atomically, with `mode` from the start."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(temporary, mode)
    temporary.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--print-token", action="store_true", help="print the token on stdout")
    args = parser.parse_args(argv)
    try:
        identity = ensure(args.directory)
    except (OSError, ValueError, AssertionError) as exc:
        print(f"dev_identity.py: {exc}", file=sys.stderr)
        return 2
    if args.print_token:
        print(identity.token.read_text().strip())
    else:
        print(
            f"development identity in {identity.directory}: jwks.json (public), token (sub={SUBJECT}), signing-key.pem"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
