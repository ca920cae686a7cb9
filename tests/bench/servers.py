"""The two comparison servers, each run as its own process so its CPU and RSS are its own.

- `raw`: the baseline. A minimal grpc.aio server on the service's own stubs that streams the
  same words as the demo model in `ChatResponse` messages shaped like the service's (event ids,
  sequence numbers, a final `done`), paced on the demo model's schedule: no agent, no telemetry.
  The answer's shape is the server's defaults (`--words`, `--delay-ms`, `--coalesce`) unless the
  request's metadata says otherwise (`words`, `delay_ms`, `words_per_message`), so one process
  serves every shape a scenario compares. Words per message may be fractional (3.4: messages of 3
  and 4 words, 3.4 on average), to match what the service's coalescing measured.
  `--loop uvloop` is the loop lever, `--processes N` runs N of them on one port (SO_REUSEPORT),
  the baseline of `AGENT_WORKERS=N`.
- `seed`: the seed's design. A sync `grpc.server(ThreadPoolExecutor(max_workers=10))` whose
  handler sleeps per token (`time.sleep`), so it holds 10 streams and the 11th waits a whole stream.

Usage: python -m tests.bench.servers {raw,seed} --port PORT [--words N] [--delay-ms MS] ...
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from concurrent import futures

import grpc

from agent_service.pacing import TokenPacer
from agent_service.proto import agent_pb2, agent_pb2_grpc

# The demo model's text reply: an acknowledgement of the prompt padded with filler words.
_PREFIX = ["This", "is", "the", "demo", "model", "answering:"]
_FILLER = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do"]


def reply_words(prompt: str, words: int) -> list[str]:
    """The words the demo model answers `prompt` with when AGENT_DEMO_REPLY_WORDS=`words` (words > 0)."""
    natural = [*_PREFIX, *prompt.split()]
    filler = (_FILLER * (words // len(_FILLER) + 1))[: max(0, words - len(natural))]
    return (natural + filler)[:words]


def _texts(words: list[str], per_message: float) -> Iterator[tuple[str, int]]:
    """Message texts of `per_message` words on average over many answers, with their word counts.

    An answer of W words goes out in W / `per_message` messages: a fractional count is rounded
    up or down at random in proportion (1.12 messages: one message 88% of the time, two 12%), so
    the average matches even when it is close to one message per answer. Words keep the demo
    model's trailing space.
    """
    wanted = len(words) / max(1.0, per_message)
    count = int(wanted) + (random.random() < wanted - int(wanted))
    count = max(1, min(len(words), count))
    start = 0
    for index in range(1, count + 1):
        end = len(words) * index // count
        group = words[start:end]
        last = end >= len(words)
        yield "".join(w if last and i == len(group) - 1 else w + " " for i, w in enumerate(group)), len(group)
        start = end


class RawServicer(agent_pb2_grpc.AgentServiceServicer):
    """The baseline: messages shaped like the service's, straight from a loop."""

    def __init__(self, words: int, delay_ms: float, coalesce: float) -> None:
        self.words = words
        self.delay_ms = delay_ms
        self.coalesce = max(1.0, coalesce)

    def shape(self, metadata: Mapping[str, str]) -> tuple[int, float, float]:
        """(words, delay in seconds, words per message) of one answer: the request's, else the server's."""
        words = int(metadata.get("words", self.words))
        delay_ms = float(metadata.get("delay_ms", self.delay_ms))
        return words, delay_ms / 1000.0, float(metadata.get("words_per_message", self.coalesce))

    async def StreamChat(  # noqa: N802 - gRPC method name
        self, request: agent_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.ChatResponse]:
        started = time.perf_counter()
        call_id = uuid.uuid4().hex[:16]
        count_words, delay_s, per_message = self.shape(request.metadata)
        words = reply_words(request.content, count_words)
        sequence = 0
        pacer = TokenPacer(delay_s)  # the demo model's schedule, so both pace alike
        for text, count in _texts(words, per_message):
            await pacer.wait(count)
            sequence += 1
            yield agent_pb2.ChatResponse(
                content=agent_pb2.ContentChunk(text=text), event_id=f"{call_id}-{sequence}", sequence=sequence, turn=1
            )
        sequence += 1
        done = agent_pb2.ChatResponse(event_id=f"{call_id}-{sequence}", sequence=sequence, turn=1)
        done.done.stop_reason = "end_turn"
        done.done.usage.input_tokens = len(request.content.split())
        done.done.usage.output_tokens = len(words)
        done.done.usage.total_tokens = done.done.usage.input_tokens + len(words)
        done.done.event_count = sequence
        done.done.duration_ms = (time.perf_counter() - started) * 1000
        yield done


class SeedServicer(agent_pb2_grpc.AgentServiceServicer):
    """The seed's handler shape: a sync generator on a pool thread, blocking for every token."""

    def __init__(self, words: int, delay_ms: float) -> None:
        self.words = words
        self.delay_s = delay_ms / 1000.0

    def StreamChat(  # noqa: N802 - gRPC method name
        self, request: agent_pb2.ChatRequest, context: grpc.ServicerContext
    ) -> Iterator[agent_pb2.ChatResponse]:
        for text, _ in _texts(reply_words(request.content, self.words), 1):
            if self.delay_s:
                time.sleep(self.delay_s)  # the seed's agent.stream() blocks its thread like this
            yield agent_pb2.ChatResponse(content=agent_pb2.ContentChunk(text=text))


_OPTIONS = [("grpc.so_reuseport", 0)]


async def serve_raw(port: int, words: int, delay_ms: float, coalesce: float, reuseport: bool = False) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)] if reuseport else _OPTIONS)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(RawServicer(words, delay_ms, coalesce), server)
    if not server.add_insecure_port(f"127.0.0.1:{port}"):
        raise OSError(f"could not bind 127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def serve_seed(port: int, words: int, delay_ms: float, workers: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=_OPTIONS)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(SeedServicer(words, delay_ms), server)
    if not server.add_insecure_port(f"127.0.0.1:{port}"):
        raise OSError(f"could not bind 127.0.0.1:{port}")
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(0.5).wait()


def _run_raw(port: int, words: int, delay_ms: float, coalesce: float, loop: str, reuseport: bool = False) -> None:
    coroutine = serve_raw(port, words, delay_ms, coalesce, reuseport)
    if loop == "uvloop":
        import uvloop

        uvloop.run(coroutine)
    else:
        asyncio.run(coroutine)


def serve_raw_group(processes: int, port: int, words: int, delay_ms: float, coalesce: float, loop: str) -> None:
    """`processes` raw servers on one port, forked before any gRPC object exists (as the service's workers are);
    SIGTERM/SIGINT here stops them all."""
    context = multiprocessing.get_context("fork")
    children = [
        context.Process(target=_run_raw, args=(port, words, delay_ms, coalesce, loop, True)) for _ in range(processes)
    ]
    for child in children:
        child.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5) and all(child.is_alive() for child in children):
        pass
    for child in children:
        if child.pid is not None and child.is_alive():
            os.kill(child.pid, signal.SIGTERM)
    for child in children:
        child.join(10)
        if child.is_alive():
            child.kill()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.servers", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["raw", "seed"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--words", type=int, default=100, help="words per answer (as AGENT_DEMO_REPLY_WORDS)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="delay per token (as AGENT_DEMO_TOKEN_DELAY_MS)")
    parser.add_argument("--coalesce", type=float, default=1.0, help="raw: words per message (may be fractional)")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio", help="raw: event loop")
    parser.add_argument("--workers", type=int, default=10, help="seed: thread pool size")
    parser.add_argument("--processes", type=int, default=1, help="raw: server processes sharing the port")
    args = parser.parse_args(argv)
    if args.kind == "seed":
        serve_seed(args.port, args.words, args.delay_ms, args.workers)
    elif args.processes > 1:
        serve_raw_group(args.processes, args.port, args.words, args.delay_ms, args.coalesce, args.loop)
    else:
        _run_raw(args.port, args.words, args.delay_ms, args.coalesce, args.loop)


if __name__ == "__main__":
    main()
