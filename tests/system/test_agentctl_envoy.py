"""agentctl through a real Envoy whose upstream connection breaks mid-answer: Envoy resets the stream
(the client sees INTERNAL, RST_STREAM), and agentctl resumes the run through Envoy and shows the
answer once."""

from __future__ import annotations

import re
from pathlib import Path

from tests.support.agentctl import DONE_RUN_ID, agentctl, demo_answer
from tests.support.servers import make_settings, running_server
from tests.support.tcp_proxy import tcp_proxy
from tests.system.front_door import render_config, running_envoy


async def test_a_stream_reset_by_envoy_is_resumed_through_envoy(tmp_path: Path) -> None:
    async with (
        running_server(make_settings(tmp_path / "data", demo_token_delay_ms=20, demo_reply_words=60)) as server,
        tcp_proxy("127.0.0.1", server.server.port) as proxy,  # Envoy's upstream connections go through it
    ):
        config = render_config(tmp_path / "envoy.yaml", ENVOY_AGENT_PORT=str(proxy.port))
        async with running_envoy(config, tmp_path) as envoy:
            proxy.cut_after(b"lorem")
            code, out, err = await agentctl(envoy.target, "chat", "through the front door")
    assert code == 0, err
    assert proxy.cuts == 1
    assert out == demo_answer("through the front door", 60) + "\n"
    match = DONE_RUN_ID.search(err)
    assert match is not None, err
    assert re.findall(r"\[connection lost \((\w+)\); resuming run (\w+)\]", err) == [("INTERNAL", match.group(1))]
