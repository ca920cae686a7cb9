"""The shipped Prometheus config, rules and dashboards against the real Prometheus, Envoy and service.

Debian's `prometheus` scrapes the agent service and Envoy on loopback with
deploy/prometheus/prometheus.yml (only the targets and intervals changed); after a
mixed load every PromQL expression of every dashboard panel and variable, and every
recording rule, must return data. A panel whose query returns nothing fails here.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from agent_service.proto import agent_pb2
from tests.support.servers import collect, free_port, read_until_error
from tests.system.conftest import FrontDoor, front_door

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
JOB_PORTS = {"agent": "agent", "envoy": "envoy"}


def _prometheus_config(workdir: Path, agent_metrics: str, envoy_metrics: str, own: str) -> Path:
    """The shipped config with loopback targets and 1 s intervals, rules copied alongside."""
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    config["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"})
    targets = {"agent": agent_metrics, "envoy": envoy_metrics, "prometheus": own}
    assert {job["job_name"] for job in config["scrape_configs"]} == set(targets)
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]], "labels": {"instance": job["job_name"]}}]
    rules_dir = workdir / "rules"
    rules_dir.mkdir()
    for path in (DEPLOY / "prometheus/rules").glob("*.yml"):
        rules = yaml.safe_load(path.read_text())
        for group in rules["groups"]:
            group["interval"] = "1s"
        (rules_dir / path.name).write_text(yaml.safe_dump(rules))
    target = workdir / "prometheus.yml"
    target.write_text(yaml.safe_dump(config))
    return target


def _dashboard_queries() -> list[tuple[str, str]]:
    queries = []
    for path in sorted((DEPLOY / "grafana/dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "datasource":
                continue
            metric = re.fullmatch(r"label_values\((\w+), \w+\)", variable["query"]["query"])
            assert metric, variable["query"]
            queries.append((f"{path.name} variable {variable['name']}", metric.group(1)))
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", "1m")
                expr = re.sub(r'=~"\$\w+"', '=~".*"', expr)
                queries.append((f"{path.name}: {panel['title']} [{target['refId']}]", expr))
    return queries


def _recording_rules() -> list[str]:
    return [
        rule["record"]
        for path in (DEPLOY / "prometheus/rules").glob("*.yml")
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    ]


async def _mixed_load(door: FrontDoor, until: float) -> None:
    """Successes, tool calls, a deadline, bad input, a busy session and an admission rejection, for a while."""
    stub = door.stub
    while time.monotonic() < until:
        await collect(stub.StreamChat(agent_pb2.ChatRequest(content="what is 12*12")))
        await collect(stub.StreamChat(agent_pb2.ChatRequest(content="hello there", session_id="prom")))
        _, error = await read_until_error(stub.StreamChat(agent_pb2.ChatRequest(content="")))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        _, error = await read_until_error(stub.StreamChat(agent_pb2.ChatRequest(content="slow " * 200), timeout=0.2))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        holders = [stub.StreamChat(agent_pb2.ChatRequest(content="hold " * 40, session_id=f"h{i}")) for i in range(2)]
        for call in holders:
            await call.read()
        _, busy = await read_until_error(stub.StreamChat(agent_pb2.ChatRequest(content="me too", session_id="h0")))
        assert busy.code() == grpc.StatusCode.ABORTED
        holders.append(stub.StreamChat(agent_pb2.ChatRequest(content="hold " * 40)))
        await holders[-1].read()
        _, full = await read_until_error(stub.StreamChat(agent_pb2.ChatRequest(content="no room")))
        assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in holders:
            await collect(call)
        await asyncio.sleep(0.2)


async def _query(client: httpx.AsyncClient, url: str, expr: str) -> list[dict[str, Any]]:
    response = await client.get(f"{url}/api/v1/query", params={"query": expr})
    body = response.json()
    assert body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


async def _evaluated_after(client: httpx.AsyncClient, url: str, moment: float) -> None:
    """Wait (bounded) until every rule group was evaluated after `moment` (Unix time), so their inputs were scraped."""
    async with asyncio.timeout(30):
        while True:
            groups = (await client.get(f"{url}/api/v1/rules")).json()["data"]["groups"]
            evaluated = [datetime.fromisoformat(g["lastEvaluation"].replace("Z", "+00:00")).timestamp() for g in groups]
            if groups and min(evaluated) > moment:
                return
            await asyncio.sleep(0.2)


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="never: `make test` installs Debian's prometheus")
async def test_every_dashboard_query_and_recording_rule_returns_data(tmp_path: Path) -> None:
    async with front_door(
        tmp_path, max_concurrent_streams=3, demo_token_delay_ms=5, envoy_vars={"ENVOY_AGENT_MAX_STREAMS": "100"}
    ) as door:
        agent_metrics = f"127.0.0.1:{door.agent.server.metrics_endpoint.port}"
        envoy_metrics = f"127.0.0.1:{door.envoy.listeners['metrics']}"
        port = free_port()
        config = _prometheus_config(tmp_path, agent_metrics, envoy_metrics, f"127.0.0.1:{port}")
        process = await asyncio.create_subprocess_exec(
            shutil.which("prometheus") or "prometheus",
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=(tmp_path / "prometheus.log").open("wb"),
        )
        url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                async with asyncio.timeout(30):
                    while True:
                        try:
                            if (await client.get(f"{url}/-/ready")).status_code == 200:
                                break
                        except httpx.HTTPError:
                            pass
                        await asyncio.sleep(0.2)
                await _mixed_load(door, until=time.monotonic() + 6)
                await _evaluated_after(client, url, time.time() + 1.5)  # the load's end is scraped and evaluated
                ups = await _query(client, url, "up")
                assert {r["metric"]["job"]: r["value"][1] for r in ups} == {
                    "agent": "1",
                    "envoy": "1",
                    "prometheus": "1",
                }

                empty = [name for name, expr in _dashboard_queries() if not await _query(client, url, expr)] + [
                    record for record in _recording_rules() if not await _query(client, url, record)
                ]
                present = await _query(client, url, 'count by (__name__) ({__name__=~"envoy_cluster_grpc.*"})')
        finally:
            process.terminate()
            await process.wait()
    assert empty == [], f"queries without data: {empty}; envoy gRPC series: {present}"
