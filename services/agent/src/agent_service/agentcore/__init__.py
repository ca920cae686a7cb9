"""The AgentCore Runtime door: the chat core over HTTP (`/invocations`, `/ping`, `/ws`).

`protocol` decodes payloads and encodes events, `invocation` answers one
`/invocations` request (refusals, SSE streaming, client disconnects), `websocket`
serves `/ws`, and `app` assembles the bedrock-agentcore SDK's app and the
`agent-agentcore` console script.
"""
