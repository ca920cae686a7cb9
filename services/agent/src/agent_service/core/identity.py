"""Who is calling: bearer tokens (JWT) verified against the identity provider's keys.

Envoy verifies tokens at the edge; the service verifies them again, so a caller that
reaches it without Envoy cannot claim to be someone else. The principal is the
token's `sub`; it owns the caller's conversations and is what per-caller limits
count. With `AGENT_AUTH=off` every caller is the one anonymous principal (admission
still tells callers apart by address).

Keys come from a JWKS file (read at start, re-read when it changes) or a JWKS URI
(fetched at start and refreshed in the background; a token signed by a key not seen
yet triggers one early refresh, at most every `MIN_REFRESH_S` or `AGENT_JWKS_REFRESH_S`
if shorter). No call waits for the
network. Only RS256 and ES256 are accepted, `exp` and `sub` are required, and the
issuer and audience are checked when configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from structlog.typing import FilteringBoundLogger

from agent_service.core.errors import ChatError, ErrorKind
from agent_service.settings import Settings
from agent_service.store import ANONYMOUS

ALGORITHMS = ("RS256", "ES256")
LEEWAY_S = 30  # clock skew tolerated on exp / nbf / iat
MIN_REFRESH_S = 30.0
FETCH_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Caller:
    """The principal a call acts for, and the key admission counts it under."""

    principal: str
    limit_key: str  # `sub:<principal>` when authenticated, `addr:<ip>` for an anonymous caller

    @property
    def authenticated(self) -> bool:
        return self.principal != ANONYMOUS


def unauthenticated(reason: str) -> ChatError:
    return ChatError(ErrorKind.UNAUTHENTICATED, f"{reason}; send a valid bearer token (authorization: Bearer ...)")


def anonymous(peer: str) -> Caller:
    """An anonymous caller, told apart by its address (the peer without its port)."""
    return Caller(ANONYMOUS, "addr:" + _address(peer))


class Authenticator:
    """Verifies bearer tokens; `identify` turns a call's credentials into its caller."""

    def __init__(self, settings: Settings, log: FilteringBoundLogger) -> None:
        self.enabled = settings.auth
        self._issuer = settings.jwt_issuer or None
        self._audiences = [a.strip() for a in settings.jwt_audiences.split(",") if a.strip()] or None
        self._jwks_file = settings.jwks_file
        self._jwks_uri = settings.jwks_uri
        self._refresh_s = settings.jwks_refresh_s
        self._min_refresh_s = min(MIN_REFRESH_S, settings.jwks_refresh_s)
        self._log = log
        self._keys: dict[str, jwt.PyJWK] = {}
        self._keys_without_kid: list[jwt.PyJWK] = []
        self._loaded = False
        self._file_stamp: tuple[int, int] | None = None
        self._last_fetch = float("-inf")
        self._refresh_now = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load the keys once (a file must load; a URI is retried in the background), then keep them fresh."""
        if not self.enabled:
            return
        if self._jwks_file is not None:
            self._load_file()
        else:
            with contextlib.suppress(ChatError):
                await self._fetch()
        self.task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def aclose(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def identify(self, authorization: str | None, peer: str) -> Caller:
        """The caller behind an `authorization` value; ChatError(UNAUTHENTICATED) when it does not hold up."""
        if not self.enabled:
            return anonymous(peer)
        if not authorization:
            raise unauthenticated("the call carries no bearer token")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthenticated("the authorization header is not 'Bearer <token>'")
        claims = self.verify(token.strip())
        return Caller(str(claims["sub"]), "sub:" + str(claims["sub"]))

    def verify(self, token: str) -> Mapping[str, Any]:
        """The token's claims once its signature, algorithm, times, issuer and audience hold."""
        if not self._loaded:
            raise ChatError(ErrorKind.UNAVAILABLE, "the identity provider's keys are not loaded yet; retry shortly")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise unauthenticated("the bearer token is malformed") from None
        algorithm = header.get("alg")
        if algorithm not in ALGORITHMS:
            raise unauthenticated(f"tokens signed with {algorithm!r} are not accepted (only {', '.join(ALGORITHMS)})")
        key = self._key_for(header.get("kid"), str(algorithm))
        try:
            return jwt.decode(
                token,
                key=key.key,
                algorithms=list(ALGORITHMS),
                audience=self._audiences,
                issuer=self._issuer,
                leeway=LEEWAY_S,
                options={"require": ["exp", "sub"], "verify_aud": self._audiences is not None},
            )
        except jwt.ExpiredSignatureError:
            raise unauthenticated("the bearer token has expired") from None
        except jwt.ImmatureSignatureError:
            raise unauthenticated("the bearer token is not valid yet") from None
        except jwt.InvalidIssuerError:
            raise unauthenticated("the bearer token was issued by another issuer") from None
        except jwt.InvalidAudienceError:
            raise unauthenticated("the bearer token is meant for another audience") from None
        except jwt.MissingRequiredClaimError as exc:
            raise unauthenticated(f"the bearer token has no {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise unauthenticated("the bearer token's signature does not verify") from None
        except jwt.PyJWTError:
            raise unauthenticated("the bearer token is not valid") from None

    def _key_for(self, kid: object, algorithm: str) -> jwt.PyJWK:
        if isinstance(kid, str) and kid in self._keys:
            return self._keys[kid]
        if kid is None:
            for candidate in self._keys_without_kid or list(self._keys.values()):
                if candidate.algorithm_name == algorithm:
                    return candidate
        self._refresh_now.set()  # a key rotated in at the provider: look again (rate limited)
        raise unauthenticated("the bearer token is signed by a key this service does not know")

    def _install(self, document: Mapping[str, Any]) -> None:
        keys: dict[str, jwt.PyJWK] = {}
        without_kid: list[jwt.PyJWK] = []
        for entry in document.get("keys", []):
            with contextlib.suppress(jwt.PyJWKError, jwt.InvalidKeyError):
                key = jwt.PyJWK(entry)
                if key.algorithm_name not in ALGORITHMS:
                    continue
                if key.key_id:
                    keys[key.key_id] = key
                else:
                    without_kid.append(key)
        self._keys, self._keys_without_kid, self._loaded = keys, without_kid, True
        self._log.info("auth.keys_loaded", keys=len(keys) + len(without_kid))

    def _load_file(self) -> None:
        assert self._jwks_file is not None
        stat = self._jwks_file.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._file_stamp:
            return
        self._install(json.loads(self._jwks_file.read_text()))
        self._file_stamp = stamp

    async def _fetch(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_fetch = loop.time()
        try:
            async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_S) as client:
                response = await client.get(self._jwks_uri)
                response.raise_for_status()
                self._install(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            self._log.warning("auth.keys_fetch_failed", uri=self._jwks_uri, error=f"{type(exc).__name__}: {exc}")
            raise ChatError(ErrorKind.UNAVAILABLE, "the identity provider's keys could not be fetched") from exc

    async def _refresh_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            interval = self._refresh_s if self._loaded else self._min_refresh_s / 6
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh_now.wait(), interval)
            self._refresh_now.clear()
            since = loop.time() - self._last_fetch
            if self._loaded and since < self._min_refresh_s:
                await asyncio.sleep(self._min_refresh_s - since)  # at most one early refresh per interval
            with contextlib.suppress(ChatError, OSError, ValueError):
                if self._jwks_file is not None:
                    self._last_fetch = loop.time()
                    self._load_file()
                else:
                    await self._fetch()


def _address(peer: str) -> str:
    """`ipv4:1.2.3.4:5678` (grpc) or `1.2.3.4:5678` → `1.2.3.4`; `ipv6:[::1]:5678` → `::1`."""
    address = peer.split(":", 1)[1] if peer.startswith(("ipv4:", "ipv6:")) else peer
    if address.startswith("["):
        return address[1 : address.find("]")]
    host, _, port = address.rpartition(":")
    return host if host and port.isdigit() else address
