"""Replicas of a test or a benchmark behind one rendered Envoy config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml


def with_upstreams(config: Path, targets: Sequence[str]) -> Path:
    """The rendered config at `config`, its `agent` cluster's endpoints replaced by `targets` (HOST:PORT each).

    Replicas of a test share 127.0.0.1 and differ by port, which one DNS name cannot list: each target
    becomes an endpoint of its own (still resolved by the cluster's STRICT_DNS)."""
    data = yaml.safe_load(config.read_text())
    (agent,) = [c for c in data["static_resources"]["clusters"] if c["name"] == "agent"]
    endpoints = []
    for target in targets:
        host, _, port = target.rpartition(":")
        endpoints.append({"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(port)}}}})
    agent["load_assignment"]["endpoints"] = [{"lb_endpoints": endpoints}]
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config
