"""The embedded `local` provider: real text from SmolLM2 on llama-server, streamed through the service."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_service.proto import agent_pb2
from tests.support.servers import collect, free_port, kinds, make_settings, running_server, text_of

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    """llama-server started by the same launcher `make run` uses (built by `make model`)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(REPO / "services/model/serve_model.py"), "--port", str(port), "--parallel", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            assert process.poll() is None, "llama-server exited; run `make model`"
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            subprocess.run(["sleep", "0.25"], check=True)
        else:
            pytest.fail("llama-server did not become healthy in 60 s")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.slow
async def test_local_model_streams_real_text(llama_server: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, model_provider="local", local_base_url=llama_server, max_tokens=48)
    async with running_server(settings) as served:
        async with asyncio.timeout(120):
            responses = await collect(served.stub.StreamChat(agent_pb2.ChatRequest(content="Say hello to me.")))
    content = [r for r in responses if r.WhichOneof("response") == "content"]
    assert len(content) >= 3, "the answer should arrive as several chunks, not one buffered block"
    assert len(text_of(responses).strip()) > 0
    assert kinds(responses)[-1] == "done"
    done = responses[-1].done
    assert done.usage.output_tokens > 0 and done.usage.input_tokens > 0


@pytest.mark.slow
async def test_the_local_defaults_are_accepted_by_llama_server_and_bound_the_answer(
    llama_server: str, tmp_path: Path
) -> None:
    """No overrides: the local provider's prompt, penalties (repeat_penalty in the request body), 256 tokens."""
    settings = make_settings(tmp_path, model_provider="local", local_base_url=llama_server)
    assert (settings.max_tokens, settings.max_stream_duration_s) == (256, 30.0)
    async with running_server(settings) as served:
        async with asyncio.timeout(60):
            responses = await collect(
                served.stub.StreamChat(agent_pb2.ChatRequest(content="Write a haiku about the sea."))
            )
    assert kinds(responses)[-1] == "done"
    done = responses[-1].done
    assert text_of(responses).strip()
    assert 0 < done.usage.output_tokens <= 256
