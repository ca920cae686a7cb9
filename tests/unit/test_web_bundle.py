"""The chat page's checked-in build is what `make web` makes from its sources.

deploy/web/src/gen/ (TypeScript from protos/) and deploy/web/dist/chat.js (the bundle Envoy
serves) are checked in, so the page needs no build step to run; these tests rebuild both with
the locked npm packages (`make web-deps`, part of `make test`) and fail on any drift. esbuild's
output depends only on its inputs and version, so the comparison is byte for byte.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.scripts import load_script

REPO = Path(__file__).resolve().parents[2]
WEB = REPO / "deploy" / "web"
BIN = WEB / "node_modules" / ".bin"
BUNDLE = WEB / "dist" / "chat.js"


@pytest.fixture(scope="module")
def npm_tools() -> Path:
    if not (BIN / "esbuild").exists() or not (BIN / "protoc-gen-es").exists():
        pytest.fail("deploy/web's npm packages are not installed: run `make web-deps`")
    return BIN


def _generator() -> ModuleType:
    return load_script("protos/generate.py", "proto_generate")


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, cwd=WEB, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{shlex.join(argv)} failed:\n{done.stdout}\n{done.stderr}"


def test_generated_typescript_matches_the_proto(npm_tools: Path, tmp_path: Path) -> None:
    generated = _generator().generate_es(tmp_path, npm_tools / "protoc-gen-es")
    checked_in = sorted((WEB / "src" / "gen").rglob("*_pb.ts"))
    assert [p.relative_to(tmp_path) for p in generated] == [p.relative_to(WEB / "src" / "gen") for p in checked_in]
    for fresh, kept in zip(generated, checked_in, strict=True):
        assert fresh.read_bytes() == kept.read_bytes(), f"{kept.relative_to(REPO)} drifted from the proto: `make web`"


def test_the_bundle_is_built_from_the_sources(npm_tools: Path, tmp_path: Path) -> None:
    """The package's own `bundle` script, with only the output path changed."""
    script = shlex.split(json.loads((WEB / "package.json").read_text())["scripts"]["bundle"])
    assert script[0] == "esbuild" and "--outfile=dist/chat.js" in script
    out = tmp_path / "chat.js"
    _run([str(npm_tools / "esbuild"), *[f"--outfile={out}" if a.startswith("--outfile=") else a for a in script[1:]]])
    assert out.read_bytes() == BUNDLE.read_bytes(), "deploy/web/dist/chat.js is stale: run `make web`"


def test_the_sources_type_check(npm_tools: Path) -> None:
    _run([str(npm_tools / "tsc"), "--noEmit", "-p", "."])


def test_the_bundle_is_small_and_calls_stream_chat() -> None:
    text = BUNDLE.read_text()
    assert len(text.encode()) < 200_000
    assert "streamChat" in text  # the method the page calls (agent.AgentService/StreamChat)
    page = (WEB / "index.html").read_text()
    assert '<script type="module" src="/chat.js"></script>' in page
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere
