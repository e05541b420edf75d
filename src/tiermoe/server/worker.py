"""The one thread that drives the engine. The LLM object is not thread-safe, so every call into it
(chat template included) runs here, one request at a time, in arrival order.

Handlers on the event loop submit a Job and await its events; the worker hands events back through
loop.call_soon_threadsafe. A cancelled job (its client left) is skipped if still queued, and its token
iterator is closed at the next token if running, which aborts generation and frees the engine.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ..engine.request import SamplingParams, TokenEvent
from ..errors import TiermoeError
from .metrics import ServerMetrics


class JobAborted(Exception):
    """The job was cancelled (its client left) before the engine finished it."""


class ServerShuttingDown(TiermoeError):
    """The server is stopping: a request still queued or running ends with this error."""

    http_status = 503
    error_type = "server_error"
    code = "server_shutting_down"


@dataclass(eq=False)  # a job is itself: hashed by identity, kept in the worker's set of live jobs
class Job:
    prompt: Callable[[], list[int]]  # token ids; runs on the worker: templates and tokenizer are the LLM's
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    echo_scores: int | None = None  # completions' echo with logprobs: alternatives per prompt token
    # Set on the worker before the first event: the prompt's ids and, with echo_scores, their scores.
    prompt_ids: list[int] = field(default_factory=list)
    prompt_scores: list | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # TokenEvent | BaseException
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Safe from any thread, any number of times, and after the job finished."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def next_event(self) -> TokenEvent:
        """The next event; raises the engine's exception, or JobAborted if the job was cancelled."""
        item = await self.events.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def put(self, item: TokenEvent | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancel()


class EngineWorker:
    def __init__(self, llm, metrics: ServerMetrics):
        self._llm = llm
        self._metrics = metrics
        self._jobs: queue.Queue[Job | None] = queue.Queue()  # None asks the thread to stop
        self._live: set[Job] = set()  # queued or running
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="tiermoe-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)

    def drain(self) -> int:
        """End every queued or running job with ServerShuttingDown (their handlers answer it: a 503, or
        an error event and [DONE] on a stream) and cancel it; returns how many there were."""
        with self._lock:
            jobs = list(self._live)
        for job in jobs:
            job.put(ServerShuttingDown("the server is shutting down; send the request again once it is back"))
            job.cancel()
        return len(jobs)

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def submit(
        self, prompt: Callable[[], list[int]], params: SamplingParams, echo_scores: int | None = None
    ) -> Job:
        """Queue a job; call from the event loop whose handler will await the job's events."""
        job = Job(prompt, params, asyncio.get_running_loop(), echo_scores)
        with self._lock:
            self._live.add(job)
        self._metrics.queued.inc()
        self._jobs.put(job)
        return job

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._metrics.queued.dec()
            try:
                if job.cancelled:
                    job.put(JobAborted())
                    continue
                self._metrics.running.inc()
                try:
                    if self._serve(job):
                        # The engine resets the store's statistics when a run starts: these are this job's.
                        self._metrics.add_store_stats(self._llm.store_stats())
                finally:
                    self._metrics.running.dec()
            finally:
                with self._lock:
                    self._live.discard(job)

    def _serve(self, job: Job) -> bool:
        """Run the job; True once the engine started generating for it."""
        stream = None
        started = False
        try:
            ids = job.prompt_ids = job.prompt()
            if job.echo_scores is not None:
                job.prompt_scores = self._llm.prompt_logprobs(ids, job.echo_scores)
            stream = self._llm.stream(ids, job.params)
            for event in stream:
                if not started:  # the first event comes out of prefill
                    started = True
                    self._metrics.prompt_tokens.inc(len(ids))
                if event.token_id is not None:
                    self._metrics.completion_tokens.inc()
                job.put(event)
                if event.finish_reason is not None:
                    return True
                if job.cancelled:
                    job.put(JobAborted())
                    return True
            # Without a final event the handler would wait forever: fail the request instead.
            raise RuntimeError("the engine's token stream ended without a finish_reason")
        except Exception as exc:  # handed to the request's handler, which maps it to an HTTP error
            job.put(exc)
            return started
        finally:
            if stream is not None:
                stream.close()  # aborts generation at once if the client left mid-stream
