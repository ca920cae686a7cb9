"""Identity at the edge (ENVOY_AUTH=on): Envoy's jwt_authn checks the bearer token of every call to the
agent on every door (gRPC, gRPC-Web, the JSON/SSE door), before the agent sees it; health checks, CORS
preflights and the chat page need none; the access log names the principal, never the token.

Keys and tokens are minted at test time (tests/support/tokens.py); the agent verifies tokens too.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent_service.proto import agent_pb2
from tests.support.json_http import json_http_server
from tests.support.servers import collect, kinds
from tests.support.tokens import Issuer
from tests.system.conftest import FrontDoor, front_door
from tests.system.front_door import grpc_web_frame, parse_grpc_web, self_signed_cert
from tests.system.test_envoy_grpc import grpcurl

ADVICE = "send a valid bearer token"


def identity(issuer: Issuer, jwks: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Envoy's variables and the agent's settings for tokens of `issuer`, keys in the JWKS file `jwks`."""
    envoy_vars = {
        "ENVOY_AUTH": "on",
        "ENVOY_JWKS_FILE": str(jwks),
        "ENVOY_JWT_ISSUER": issuer.issuer,
        "ENVOY_JWT_AUDIENCES": issuer.audience,
    }
    settings = {"auth": True, "jwks_file": jwks, "jwt_issuer": issuer.issuer, "jwt_audiences": issuer.audience}
    return envoy_vars, settings


@asynccontextmanager
async def secured_door(
    tmp_path: Path, issuer: Issuer, agent: dict[str, Any] | None = None, **envoy_vars: str
) -> AsyncIterator[FrontDoor]:
    """The agent behind Envoy, both checking tokens of `issuer`; `agent`: more of the agent's settings."""
    variables, settings = identity(issuer, issuer.write_jwks(tmp_path / "jwks.json"))
    async with front_door(tmp_path, envoy_vars={**variables, **envoy_vars}, **settings, **(agent or {})) as door:
        yield door


def bearer(token: str | None) -> dict[str, str]:
    return {} if token is None else {"authorization": f"Bearer {token}"}


async def grpc_call(door: FrontDoor, headers: dict[str, str], content: str = "hi") -> tuple[str, str]:
    """(status name, details) of a StreamChat over gRPC (h2c)."""
    try:
        responses = await collect(
            door.stub.StreamChat(agent_pb2.ChatRequest(content=content), metadata=tuple(headers.items()), timeout=10)
        )
    except grpc.aio.AioRpcError as error:
        return error.code().name, error.details() or ""
    assert kinds(responses)[-1] == "done"
    return "OK", ""


async def grpc_web_call(client: httpx.AsyncClient, headers: dict[str, str], content: str = "hi") -> tuple[str, str]:
    """(status name, message) of a StreamChat over gRPC-Web: a trailers-only answer or a trailer frame."""
    response = await client.post(
        "/agent.AgentService/StreamChat",
        content=grpc_web_frame(agent_pb2.ChatRequest(content=content).SerializeToString()),
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1", **headers},
    )
    _, trailers = parse_grpc_web(response.content)
    status = trailers.get("grpc-status", response.headers.get("grpc-status"))
    message = trailers.get("grpc-message", response.headers.get("grpc-message", ""))
    assert status is not None, (response.status_code, response.headers)
    return grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == int(status))).name, message


async def sse_call(client: httpx.AsyncClient, headers: dict[str, str], content: str = "hi") -> tuple[int, str]:
    """(HTTP status, the google.rpc.Status message or the last event) of a POST to the JSON door."""
    response = await client.post("/v1/chat:stream", json={"content": content}, headers=headers)
    if response.status_code != 200:
        assert response.headers["content-type"] == "application/json", response.text
        return response.status_code, response.json()["message"]
    events = [line for line in response.text.splitlines() if line.startswith("data: ")]
    return 200, events[-1]


async def test_every_bad_token_is_refused_by_envoy_on_every_door_before_the_agent_sees_it(tmp_path: Path) -> None:
    issuer = Issuer()
    cases: dict[str, dict[str, str]] = {
        "missing": {},
        "not-bearer": {"authorization": f"Basic {issuer.token()}"},
        **{name: bearer(token) for name, (token, _) in issuer.bad_tokens().items() if name != "no-subject"},
    }
    outcomes: dict[str, tuple[object, ...]] = {}
    async with (
        secured_door(tmp_path, issuer) as door,
        httpx.AsyncClient(base_url=door.envoy.url, timeout=30) as client,
    ):
        for name, headers in cases.items():
            outcomes[name] = (
                await grpc_call(door, headers),
                await grpc_web_call(client, headers),
                await sse_call(client, headers),
            )
        entries = await door.envoy.access_log(lambda found: len(calls(found)) >= 3 * len(cases))

    wrong = {
        name: outcome
        for name, outcome in outcomes.items()
        if not (
            [status for status, _ in outcome[:2]] == ["UNAUTHENTICATED"] * 2
            and outcome[2][0] == 401  # type: ignore[index]
            and all(ADVICE in str(message) for _, message in outcome)  # type: ignore[misc]
        )
    }
    assert wrong == {}, wrong
    print(json.dumps({name: outcome[0][1] for name, outcome in outcomes.items()}, indent=1))
    refused = calls(entries)
    assert len(refused) == 3 * len(cases)
    for entry in refused:  # Envoy answered: nothing reached an upstream
        assert entry["upstream_host"] is None, entry
        assert entry["response_code_details"].startswith("jwt_authn_access_denied"), entry
        assert (entry["grpc_status"], entry["grpc_status_code"]) == ("Unauthenticated", 16), entry


def calls(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e["path"] in ("/agent.AgentService/StreamChat", "/v1/chat:stream")]


async def test_a_token_without_a_subject_passes_envoy_and_the_agent_refuses_it(tmp_path: Path) -> None:
    """Envoy checks signature, times, issuer and audience; the agent also needs `sub` (its principal)."""
    issuer = Issuer()
    token, reason = issuer.bad_tokens()["no-subject"]
    async with secured_door(tmp_path, issuer) as door:
        status, details = await grpc_call(door, bearer(token))
    assert status == "UNAUTHENTICATED" and reason in details


async def test_valid_tokens_reach_the_agent_and_the_log_has_the_principal_and_the_real_status(
    tmp_path: Path,
) -> None:
    """RS256 and ES256 on all three doors. The access log records the principal (never the token) and
    the real gRPC status: OK for gRPC-Web, INVALID_ARGUMENT for a transcoded JSON call."""
    issuer = Issuer()
    rsa, ec = issuer.token(sub="alice", alg="RS256"), issuer.token(sub="bob", alg="ES256")
    async with (
        secured_door(tmp_path, issuer) as door,
        httpx.AsyncClient(base_url=door.envoy.url, timeout=30) as client,
    ):
        for token in (rsa, ec):
            assert await grpc_call(door, bearer(token)) == ("OK", "")
            assert (await grpc_web_call(client, bearer(token)))[0] == "OK"
            status, last = await sse_call(client, bearer(token))
            assert status == 200 and '"done"' in last
        status, message = await sse_call(client, bearer(rsa), content="")
        assert (status, message) == (400, "content must not be empty")
        entries = await door.envoy.access_log(lambda found: len(calls(found)) >= 7)
        log_text = door.envoy.access_log_path.read_text()

    assert rsa not in log_text and ec not in log_text, "a token was logged"
    logged = [
        (e["protocol"], e["content_type"], e["principal"], e["grpc_status"], e["response_code"]) for e in calls(entries)
    ]
    assert logged == [
        ("HTTP/2", "application/grpc", "alice", "OK", 200),
        ("HTTP/1.1", "application/grpc", "alice", "OK", 200),  # gRPC-Web (its filter made it gRPC)
        ("HTTP/1.1", "application/grpc", "alice", "OK", 200),  # the JSON door, transcoded
        ("HTTP/2", "application/grpc", "bob", "OK", 200),
        ("HTTP/1.1", "application/grpc", "bob", "OK", 200),
        ("HTTP/1.1", "application/grpc", "bob", "OK", 200),
        ("HTTP/1.1", "application/grpc", "alice", "InvalidArgument", 400),
    ]
    assert [e["grpc_status_code"] for e in calls(entries)] == [0] * 6 + [3]


async def test_health_preflights_and_the_chat_page_need_no_token_reflection_does(tmp_path: Path) -> None:
    issuer = Issuer()
    origin = "http://app.example"
    async with (
        secured_door(tmp_path, issuer, ENVOY_CORS_ORIGINS=origin) as door,
        httpx.AsyncClient(base_url=door.envoy.url, timeout=30) as client,
    ):
        health = health_pb2_grpc.HealthStub(door.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="agent.AgentService"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        for path in ("/", "/chat.js", "/chat.css"):
            assert (await client.get(path)).status_code == 200, path
        for path in ("/v1/chat:stream", "/agent.AgentService/StreamChat"):
            preflight = await client.options(
                path,
                headers={
                    "origin": origin,
                    "access-control-request-method": "POST",
                    "access-control-request-headers": "authorization, content-type",
                },
            )
            assert preflight.status_code == 200, path
            assert preflight.headers["access-control-allow-origin"] == origin
        code, _, err = await grpcurl("-plaintext", door.envoy.target, "list")
        assert code != 0 and "Unauthenticated" in err, err
        code, out, err = await grpcurl(
            "-plaintext", "-H", f"authorization: Bearer {issuer.token()}", door.envoy.target, "list"
        )
        assert code == 0 and "agent.AgentService" in out, err


@contextmanager
def jwks_over_https(directory: Path, jwks: dict[str, Any]) -> Iterator[tuple[str, Path, list[float]]]:
    """An identity provider's JWKS endpoint on https://localhost:PORT/jwks.json (a self-signed certificate);
    yields its URL, the certificate (the CA to trust) and the times it was fetched."""
    cert, key = self_signed_cert(directory)
    fetched: list[float] = []

    def respond(method: str, path: str, body: bytes) -> tuple[int, Any]:
        fetched.append(time.monotonic())
        return (200 if path == "/jwks.json" else 404), jwks

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with json_http_server(respond, tls=context) as port:
        yield f"https://localhost:{port}/jwks.json", cert, fetched


async def test_keys_from_a_jwks_uri_over_tls(tmp_path: Path) -> None:
    """Kubernetes production's setting: Envoy fetches the provider's JWKS over TLS, verifying its certificate."""
    issuer = Issuer()
    with jwks_over_https(tmp_path, issuer.jwks()) as (url, ca, fetched):
        async with secured_door(tmp_path, issuer, ENVOY_JWKS_URI=url, ENVOY_JWKS_CA=str(ca)) as door:
            deadline = time.monotonic() + 15
            while (outcome := await grpc_call(door, bearer(issuer.token(alg="ES256")))) != ("OK", ""):
                assert time.monotonic() < deadline, f"still {outcome}: the JWKS was not fetched ({fetched})"
                await asyncio.sleep(0.2)
            assert fetched, "Envoy never asked the JWKS endpoint"
            assert await grpc_call(door, bearer(issuer.token(alg="RS256"))) == ("OK", "")
            stranger = Issuer().token()
            status, details = await grpc_call(door, bearer(stranger))
            assert status == "UNAUTHENTICATED" and ADVICE in details
