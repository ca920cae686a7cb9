"""The load generator: grpc.aio clients in several worker processes, every loop bounded in count and time.

A load is `users` concurrent virtual users split across the worker processes. Each user runs up
to `streams_per_user` StreamChat calls one after another, stopping early once `duration_s` has
passed; users start spread evenly over `ramp_s`. Workers connect and warm up first, then start together
at a barrier; their timestamps are CLOCK_MONOTONIC, which is system-wide on Linux, so a phase's
window (first start to last end) is comparable across processes.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from agent_service.proto import agent_pb2, agent_pb2_grpc

_BARRIER_TIMEOUT_S = 120.0  # connecting and warming up, before a phase starts
_CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),  # each channel its own connection
    ("grpc.max_receive_message_length", 16 << 20),
]


@dataclass(frozen=True)
class LoadSpec:
    """What one load phase does (the whole phase; the pool splits `users` across workers)."""

    target: str
    users: int = 1
    streams_per_user: int = 1
    duration_s: float = 0.0  # > 0: users start no new stream after this long
    ramp_s: float = 0.0
    prompt: str = "bench"
    # Request metadata: the raw baseline takes the answer's shape from it (words, delay, words per message).
    metadata: tuple[tuple[str, str], ...] = ()
    call_timeout_s: float = 60.0
    time_cap_s: float = 300.0  # hard bound of the phase, whatever else happens
    record_gaps: bool = False
    measure_rounds: tuple[int, int] = (0, 1 << 30)  # rounds [from, to) recorded; the others (ramp, tail) only run
    streams_per_channel: int = 100  # connections per worker: ceil(users / this)
    warmup_calls: int = 2


@dataclass
class LoadResult:
    """Raw measurements of a phase, merged across workers (times in seconds)."""

    ttfc: array[float] = field(default_factory=lambda: array("d"))
    duration: array[float] = field(default_factory=lambda: array("d"))
    gaps: array[float] = field(default_factory=lambda: array("d"))
    codes: Counter[str] = field(default_factory=Counter)
    # Words of content received, and the content messages that carried them, in every stream of the
    # phase. The baseline sends a fixed number of words per message; the service may send several
    # waiting words in one message (AGENT_COALESCE_TEXT): the two are compared at equal words per message.
    words: int = 0
    messages: int = 0
    streams: int = 0  # streams recorded (measured rounds)
    streams_run: int = 0  # every stream, ramp rounds included
    window_start: float = float("inf")
    window_end: float = 0.0
    client_cpu_s: float = 0.0
    workers: int = 0

    @property
    def wall_s(self) -> float:
        return max(0.0, self.window_end - self.window_start)

    def merge(self, other: LoadResult) -> None:
        self.ttfc.extend(other.ttfc)
        self.duration.extend(other.duration)
        self.gaps.extend(other.gaps)
        self.codes.update(other.codes)
        self.words += other.words
        self.messages += other.messages
        self.streams += other.streams
        self.streams_run += other.streams_run
        self.window_start = min(self.window_start, other.window_start)
        self.window_end = max(self.window_end, other.window_end)
        self.client_cpu_s += other.client_cpu_s
        self.workers += other.workers


class _Worker:
    """One worker process's share of a phase."""

    def __init__(self, spec: LoadSpec, start: Any) -> None:
        self.spec = spec
        self.start = start  # a Manager().Barrier shared with the other workers and the pool
        self.result = LoadResult(workers=1)
        self.request = agent_pb2.ChatRequest(content=spec.prompt, metadata=dict(spec.metadata))
        self._started = 0.0

    async def run(self) -> LoadResult:
        spec = self.spec
        count = max(1, -(-spec.users // spec.streams_per_channel))
        channels = [grpc.aio.insecure_channel(spec.target, options=_CHANNEL_OPTIONS) for _ in range(count)]
        try:
            try:
                await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), timeout=30)
                stubs = [agent_pb2_grpc.AgentServiceStub(c) for c in channels]
                for index in range(spec.warmup_calls):
                    await self._stream(stubs[index % len(stubs)], record=False)
            except BaseException:
                self.start.abort()  # the others must not wait for this worker
                raise
            await asyncio.to_thread(self.start.wait, _BARRIER_TIMEOUT_S)
            cpu_before = time.process_time()
            self._started = time.monotonic()
            self.result.window_start = self._started
            users = [self._user(index, stubs[index % len(stubs)]) for index in range(spec.users)]
            await asyncio.wait_for(asyncio.gather(*users), timeout=spec.time_cap_s + spec.call_timeout_s + 5)
            self.result.window_end = time.monotonic()
            self.result.client_cpu_s = time.process_time() - cpu_before
        finally:
            await asyncio.gather(*(c.close() for c in channels))
        return self.result

    async def _user(self, index: int, stub: agent_pb2_grpc.AgentServiceStub) -> None:
        spec = self.spec
        await asyncio.sleep(spec.ramp_s * index / max(1, spec.users))
        for round_ in range(spec.streams_per_user):
            elapsed = time.monotonic() - self._started
            if (spec.duration_s and elapsed >= spec.duration_s) or elapsed >= spec.time_cap_s:
                return
            await self._stream(stub, record=spec.measure_rounds[0] <= round_ < spec.measure_rounds[1])

    async def _stream(self, stub: agent_pb2_grpc.AgentServiceStub, *, record: bool) -> None:
        """One StreamChat call, read to its end; its words always count, its timings only when `record`."""
        gaps = self.result.gaps if record and self.spec.record_gaps else None
        words = messages = responses = 0
        first = 0.0
        started = last = time.monotonic()
        call = stub.StreamChat(self.request, timeout=self.spec.call_timeout_s)
        try:
            async for response in call:
                now = time.monotonic()
                if not responses:
                    first = now
                elif gaps is not None:
                    gaps.append(now - last)
                last = now
                responses += 1
                if response.WhichOneof("response") == "content":
                    messages += 1
                    words += len(response.content.text.split())
            code = "OK"
        except grpc.aio.AioRpcError as error:
            code = error.code().name
        ended = time.monotonic()
        if not record and self.result.window_start == float("inf"):
            return  # a warm-up call
        self.result.words += words
        self.result.messages += messages
        self.result.streams_run += 1
        if record:
            self.result.streams += 1
            self.result.codes[code] += 1
            self.result.duration.append(ended - started)
            if responses:
                self.result.ttfc.append(first - started)


def run_worker(spec: LoadSpec, start: Any) -> LoadResult:
    """Entry point in a worker process."""
    return asyncio.run(_Worker(spec, start).run())


def _ping() -> int:
    import os

    time.sleep(0.2)
    return os.getpid()


class LoadPool:
    """A pool of spawned worker processes, reused across phases."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        context = multiprocessing.get_context("spawn")  # never fork a process that has grpc threads
        self._executor = ProcessPoolExecutor(self.workers, mp_context=context)
        self._manager = context.Manager()

    def warm(self) -> None:
        """Start every worker process now, not inside the first measurement."""
        for future in [self._executor.submit(_ping) for _ in range(self.workers)]:
            future.result(timeout=60)

    def run(self, spec: LoadSpec, workers: int | None = None, on_start: Callable[[], None] | None = None) -> LoadResult:
        """Run a phase: `spec.users` split across `workers` processes (default all), merged results.

        `on_start` runs the moment the workers are connected and warmed up and the load begins
        (the caller snapshots server CPU there).
        """
        count = max(1, min(workers or self.workers, self.workers, spec.users))
        shares = [spec.users // count + (1 if i < spec.users % count else 0) for i in range(count)]
        start = self._manager.Barrier(count + 1)
        jobs = [self._executor.submit(run_worker, replace(spec, users=n), start) for n in shares]
        try:
            start.wait(_BARRIER_TIMEOUT_S + 10)
        except threading.BrokenBarrierError:
            for job in jobs:
                job.result(timeout=_BARRIER_TIMEOUT_S)  # raises the worker's own error
            raise
        if on_start is not None:
            on_start()
        merged = LoadResult()
        for job in jobs:
            merged.merge(job.result(timeout=spec.time_cap_s + spec.call_timeout_s + 60))
        return merged

    def call(self, function: Callable[..., Any], *args: Any, timeout_s: float = 600) -> Any:
        """Run `function(*args)` in one of the worker processes (an in-process micro-benchmark)."""
        return self._executor.submit(function, *args).result(timeout=timeout_s)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._manager.shutdown()

    def __enter__(self) -> LoadPool:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()
