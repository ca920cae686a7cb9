"""Generate the code of the agent contract (`make protos`; the drift tests call it too).

The proto lives at protos/agent/agent.proto (package `agent`); it is compiled under
the import path `agent_service/proto/agent.proto` so that the generated modules
import each other as `agent_service.proto.*` without any post-processing.

Two outputs, both checked in:
- the Python code (agent_pb2.py, .pyi, agent_pb2_grpc.py) under OUT_DIR/agent_service/proto;
- a descriptor set with every import (`--include_imports`) for Envoy's gRPC-JSON
  transcoder, by default deploy/envoy/agent.pb.

Includes: google/api/annotations.proto (the HTTP annotations) comes from the installed
googleapis-common-protos package, google/protobuf/*.proto from grpcio-tools.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent
PROTO_FILE = PROTOS / "agent" / "agent.proto"
IMPORT_PATH = "agent_service/proto"
DESCRIPTOR_SET = PROTOS.parent / "deploy" / "envoy" / "agent.pb"


def _include_dirs() -> list[str]:
    """google/protobuf/*.proto from grpcio-tools, google/api/*.proto from googleapis-common-protos."""
    tools_spec = importlib.util.find_spec("grpc_tools")
    api_spec = importlib.util.find_spec("google.api.annotations_pb2")
    if tools_spec is None or tools_spec.origin is None or api_spec is None or api_spec.origin is None:
        raise SystemExit("grpcio-tools and googleapis-common-protos must be installed (make install)")
    well_known = Path(tools_spec.origin).parent / "_proto"
    googleapis = Path(api_spec.origin).parents[2]  # .../site-packages holding google/api/annotations.proto
    if not (googleapis / "google" / "api" / "annotations.proto").is_file():
        raise SystemExit(f"google/api/annotations.proto not found under {googleapis}")
    return [f"-I{well_known}", f"-I{googleapis}"]


def _protoc(args: list[str]) -> None:
    if protoc.main(["grpc_tools.protoc", f"-I{IMPORT_PATH}={PROTO_FILE.parent}", *_include_dirs(), *args]) != 0:
        raise SystemExit(f"protoc failed on {PROTO_FILE}")


def generate(out_dir: Path) -> list[Path]:
    """Write agent_pb2.py, agent_pb2.pyi and agent_pb2_grpc.py under out_dir/agent_service/proto."""
    target = out_dir / IMPORT_PATH
    target.mkdir(parents=True, exist_ok=True)
    _protoc([f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", str(PROTO_FILE)])
    return sorted(target.glob("agent_pb2*.py*"))


def generate_descriptor_set(path: Path = DESCRIPTOR_SET) -> Path:
    """Write the binary FileDescriptorSet of the contract and all its imports (Envoy's transcoder reads it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _protoc([f"--descriptor_set_out={path}", "--include_imports", str(PROTO_FILE)])
    return path


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: generate.py OUT_DIR [DESCRIPTOR_SET]  (e.g. services/agent/src deploy/envoy/agent.pb)")
    for written in generate(Path(sys.argv[1])):
        print(written)
    print(generate_descriptor_set(Path(sys.argv[2]) if len(sys.argv) == 3 else DESCRIPTOR_SET))
