"""The checked-in generated code is exactly what `make protos` produces from protos/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHECKED_IN = REPO / "services" / "agent" / "src" / "agent_service" / "proto"


def _generator():
    spec = importlib.util.spec_from_file_location("proto_generate", REPO / "protos" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    generated = _generator().generate(tmp_path)
    assert [p.name for p in generated] == ["agent_pb2.py", "agent_pb2.pyi", "agent_pb2_grpc.py"]
    for path in generated:
        assert path.read_bytes() == (CHECKED_IN / path.name).read_bytes(), (
            f"{path.name} drifted from protos/agent/agent.proto: run `make protos`"
        )
