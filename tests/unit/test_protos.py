"""The checked-in generated code is exactly what `make protos` produces from protos/."""

from __future__ import annotations

from pathlib import Path

from tests.support.scripts import load_script

REPO = Path(__file__).resolve().parents[2]
CHECKED_IN = REPO / "services" / "agent" / "src" / "agent_service" / "proto"


def _generator():
    return load_script("protos/generate.py", "proto_generate")


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    generated = _generator().generate(tmp_path)
    assert [p.name for p in generated] == ["agent_pb2.py", "agent_pb2.pyi", "agent_pb2_grpc.py"]
    for path in generated:
        assert path.read_bytes() == (CHECKED_IN / path.name).read_bytes(), (
            f"{path.name} drifted from protos/agent/agent.proto: run `make protos`"
        )


DESCRIPTOR_SET = REPO / "deploy" / "envoy" / "agent.pb"


def test_envoy_descriptor_set_matches_the_proto(tmp_path: Path) -> None:
    generated = _generator().generate_descriptor_set(tmp_path / "agent.pb")
    assert generated.read_bytes() == DESCRIPTOR_SET.read_bytes(), (
        "deploy/envoy/agent.pb drifted from protos/agent/agent.proto: run `make protos`"
    )


def test_descriptor_set_carries_the_http_route_and_its_imports() -> None:
    from google.api import annotations_pb2
    from google.protobuf import descriptor_pb2

    descriptors = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    names = [f.name for f in descriptors.file]
    assert "google/api/annotations.proto" in names and "google/protobuf/descriptor.proto" in names
    (agent,) = [f for f in descriptors.file if f.package == "agent"]
    (service,) = agent.service
    assert f"{agent.package}.{service.name}" == "agent.AgentService"  # what Envoy's transcoder names
    methods = {m.name: m for m in service.method}
    rule = methods["StreamChat"].options.Extensions[annotations_pb2.http]
    assert (rule.post, rule.body) == ("/v1/chat:stream", "*")
    assert methods["StreamChat"].server_streaming and not methods["StreamChat"].client_streaming
