"""Wire compatibility with the seed's agent.proto: same names and numbers, and its clients work."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from agent_service.proto import agent_pb2
from tests.support.servers import Running, session_of

SEED_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "seed"


def _seed_file_descriptor(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path / "seed.pb"
    assert protoc.main(["protoc", f"-I{SEED_DIR}", f"--descriptor_set_out={out}", "agent.proto"]) == 0
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return files.file[0]


def test_every_seed_name_and_number_is_unchanged(tmp_path: Path) -> None:
    seed = _seed_file_descriptor(tmp_path)
    ours = descriptor_pb2.FileDescriptorProto()
    agent_pb2.DESCRIPTOR.CopyToProto(ours)

    assert ours.package == seed.package == "agent"
    our_messages = {m.name: m for m in ours.message_type}
    for message in seed.message_type:
        assert message.name in our_messages
        our_fields = {f.number: f for f in our_messages[message.name].field}
        for field in message.field:
            mine = our_fields[field.number]
            assert (mine.name, mine.type, mine.label, mine.type_name) == (
                field.name,
                field.type,
                field.label,
                field.type_name,
            ), f"{message.name}.{field.name}"
            assert mine.HasField("oneof_index") == field.HasField("oneof_index")
    (seed_service,) = seed.service
    our_service = next(s for s in ours.service if s.name == seed_service.name)
    our_methods = {m.name: m for m in our_service.method}
    for method in seed_service.method:
        mine = our_methods[method.name]
        assert (mine.input_type, mine.output_type, mine.client_streaming, mine.server_streaming) == (
            method.input_type,
            method.output_type,
            method.client_streaming,
            method.server_streaming,
        )


async def test_a_client_generated_from_the_seed_proto_works(served: Running, tmp_path: Path) -> None:
    generated = tmp_path / "seed_gen"
    generated.mkdir()
    args = ["protoc", f"-I{SEED_DIR}", f"--python_out={generated}", f"--grpc_python_out={generated}", "agent.proto"]
    assert protoc.main(args) == 0
    script = Path(__file__).resolve().parents[1] / "support" / "seed_client.py"
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(generated), served.target, stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0
    calls = {line["call"]: line for line in map(json.loads, stdout.decode().splitlines())}

    stream = calls["StreamChat"]
    assert stream["tools"] == ["calculator"]
    assert stream["results"] == ["3*5 = 15"]
    assert stream["text"].endswith("3*5 = 15")
    # The `done` event is unknown to the seed: it arrives as an empty oneof and is ignored.
    assert stream["kinds"][:2] == ["tool_use", "tool_result"] and stream["kinds"][-1] is None
    assert stream["event_ids"] == len(stream["kinds"])

    bidi = calls["BidirectionalChat"]
    assert bidi["text"] == "This is the demo model answering: helloThis is the demo model answering: again"
    assert calls["session"]["text"].endswith("hi")
    assert session_of(served, "seed-client").agent is not None
