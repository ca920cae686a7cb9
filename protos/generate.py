"""Generate the code of the agent contract (`make protos`; the drift tests call it too).

The proto lives at protos/agent/agent.proto (package `agent`); it is compiled under
the import path `agent_service/proto/agent.proto` so that the generated modules
import each other as `agent_service.proto.*` without any post-processing.

Three outputs, all checked in:
- the Python code (agent_pb2.py, .pyi, agent_pb2_grpc.py) under OUT_DIR/agent_service/proto;
- a descriptor set with every import (`--include_imports`) for Envoy's gRPC-JSON
  transcoder, by default deploy/envoy/agent.pb;
- TypeScript for the chat page (`make web`): agent/agent_pb.ts and the google/api files it
  imports, written by protoc-gen-es (from deploy/web's npm packages) run by this protoc.

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


def generate_es(out_dir: Path, plugin: Path) -> list[Path]:
    """Write agent/agent_pb.ts (and google/api/*_pb.ts, which it imports) under out_dir with protoc-gen-es.

    The proto keeps its own path (agent/agent.proto) here: the browser never sees Python's
    import path. Imports are extensionless, as esbuild resolves them.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [f"-I{PROTO_FILE.parents[1]}", *_include_dirs(), f"--plugin=protoc-gen-es={plugin}"]
    args += [f"--es_out={out_dir}", "--es_opt=target=ts,import_extension=none"]
    files = [str(PROTO_FILE), "google/api/annotations.proto", "google/api/http.proto"]
    if protoc.main(["grpc_tools.protoc", *args, *files]) != 0:
        raise SystemExit(f"protoc-gen-es failed on {PROTO_FILE}")
    return sorted(out_dir.rglob("*_pb.ts"))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--es":
        for written in generate_es(Path(sys.argv[2]), Path(sys.argv[3])):
            print(written)
        raise SystemExit(0)
    if len(sys.argv) not in (2, 3):
        raise SystemExit(
            "usage: generate.py OUT_DIR [DESCRIPTOR_SET]  (e.g. services/agent/src deploy/envoy/agent.pb)\n"
            "       generate.py --es TS_OUT_DIR PROTOC_GEN_ES"
            "  (e.g. deploy/web/src/gen deploy/web/node_modules/.bin/protoc-gen-es)"
        )
    for written in generate(Path(sys.argv[1])):
        print(written)
    print(generate_descriptor_set(Path(sys.argv[2]) if len(sys.argv) == 3 else DESCRIPTOR_SET))
