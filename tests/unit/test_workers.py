"""The pure parts of `AGENT_WORKERS`: how many workers 0 means, the port reservation, the group's process metrics."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, ProcessCollector

from agent_service.settings import Settings, cgroup_cpu_quota, usable_cores
from agent_service.telemetry.metrics import GroupProcessCollector
from agent_service.workers import reserve_port


def test_workers_default_to_one_process_and_zero_means_one_per_usable_core() -> None:
    assert Settings().workers == 1
    assert Settings().resolved_workers() == 1
    assert Settings(workers=3).resolved_workers() == 3
    assert Settings(workers=0).resolved_workers() == usable_cores()
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)
    with pytest.raises(ValueError):
        Settings(workers=-1)


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
    ids=["v2-unlimited", "v2-quota", "v1-quota", "v1-unlimited", "no-cgroup"],
)
def test_a_cgroup_cpu_quota_is_read_in_cores(tmp_path: Path, files: dict[str, str], quota: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == quota


def test_a_reserved_port_is_shared_only_by_reuseport_sockets() -> None:
    with reserve_port("127.0.0.1", 0) as first:
        port = first.getsockname()[1]
        with reserve_port("127.0.0.1", port) as second:  # what each worker's grpc.so_reuseport bind does
            assert second.getsockname()[1] == port
        with socket.socket() as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        with pytest.raises(OSError):
            reserve_port("127.0.0.1", holder.getsockname()[1])


def test_the_group_process_metrics_sum_the_processes() -> None:
    alone = {f.name: f.samples[0].value for f in ProcessCollector(registry=None).collect()}
    registry = CollectorRegistry()
    registry.register(GroupProcessCollector(lambda: [os.getpid(), os.getpid()]))
    group = {f.name: f.samples[0].value for f in registry.collect()}
    assert set(group) == set(alone)
    assert group["process_resident_memory_bytes"] == pytest.approx(2 * alone["process_resident_memory_bytes"], 0.1)
    assert group["process_cpu_seconds"] >= 2 * alone["process_cpu_seconds"]
    assert group["process_start_time_seconds"] == alone["process_start_time_seconds"]
    assert group["process_max_fds"] == alone["process_max_fds"]
