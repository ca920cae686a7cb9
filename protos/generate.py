"""Generate the Python code of the agent contract (`make protos`; the drift test calls it too).

The proto lives at protos/agent/agent.proto (package `agent`); it is compiled under
the import path `agent_service/proto/agent.proto` so that the generated modules
import each other as `agent_service.proto.*` without any post-processing.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent
PROTO_FILE = PROTOS / "agent" / "agent.proto"
IMPORT_PATH = "agent_service/proto"


def generate(out_dir: Path) -> list[Path]:
    """Write agent_pb2.py, agent_pb2.pyi and agent_pb2_grpc.py under out_dir/agent_service/proto."""
    target = out_dir / IMPORT_PATH
    target.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{IMPORT_PATH}={PROTO_FILE.parent}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO_FILE}")
    return sorted(target.glob("agent_pb2*.py*"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: generate.py OUT_DIR  (e.g. services/agent/src)")
    for path in generate(Path(sys.argv[1])):
        print(path)
