"""A client generated from the *seed's* agent.proto, run as its own process.

Usage: seed_client.py GENERATED_DIR TARGET. Prints one JSON line per call with what
a seed client can see. It runs apart from the test process because the seed's
generated module registers the same `agent.*` message names as ours.
"""

from __future__ import annotations

import json
import sys

import grpc

sys.path.insert(0, sys.argv[1])
import agent_pb2
import agent_pb2_grpc


def summarize(responses) -> dict:
    return {
        "kinds": [r.WhichOneof("response") for r in responses],
        "text": "".join(r.content.text for r in responses if r.HasField("content")),
        "tools": [r.tool_use.tool_name for r in responses if r.HasField("tool_use")],
        "results": [r.tool_result.output for r in responses if r.HasField("tool_result")],
        "event_ids": len({r.event_id for r in responses}),
    }


def main() -> None:
    with grpc.insecure_channel(sys.argv[2]) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        stream = list(stub.StreamChat(agent_pb2.ChatRequest(content="what is 3*5?"), timeout=30))
        print(json.dumps({"call": "StreamChat", **summarize(stream)}))
        requests = iter([agent_pb2.ChatRequest(content="hello"), agent_pb2.ChatRequest(content="again")])
        bidi = list(stub.BidirectionalChat(requests, timeout=30))
        print(json.dumps({"call": "BidirectionalChat", **summarize(bidi)}))
        session = agent_pb2.ChatRequest(content="hi", metadata={"session_id": "seed-client"})
        print(json.dumps({"call": "session", **summarize(list(stub.StreamChat(session, timeout=30)))}))


if __name__ == "__main__":
    main()
