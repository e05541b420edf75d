"""The one thread that drives the engine. The LLM object is not thread-safe, so every call into it
(chat template included) runs here. Requests run concurrently: each job becomes an engine request, and
the thread steps the engine while any is unfinished (engine/scheduler.py decides who runs each step).

Handlers on the event loop submit a Job and await its events; the worker hands events back through
loop.call_soon_threadsafe. A cancelled job (its client left) is dropped if not yet added, and aborted at
the next step boundary if running, which frees its KV blocks for that step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ..engine.request import SamplingParams, TokenEvent
from ..errors import TiermoeError
from .metrics import ServerMetrics

log = logging.getLogger(__name__)


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
    """The engine thread: takes new jobs between steps, adds them to the engine, aborts the ones whose
    client left, runs one engine step and hands each event to its job."""

    def __init__(self, llm, metrics: ServerMetrics):
        self._llm = llm
        self._engine = llm.engine
        self._metrics = metrics
        self._jobs: queue.Queue[Job | None] = queue.Queue()  # None asks the thread to stop
        self._live: set[Job] = set()  # queued or running
        self._running: dict[int, tuple[Job, object]] = {}  # request id -> (job, request)
        self._lock = threading.Lock()
        self._stopping = False
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
        return self._jobs.qsize() + len(self._engine.scheduler.waiting)

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
        # The engine is stepped only while this thread has requests in it: an idle worker never touches
        # the LLM, so a caller that waited for idle may use it directly (tests, notebooks).
        while not self._stopping:
            self._take_jobs(block=not self._running)
            self._abort_cancelled()
            if self._running:
                try:
                    self._step()
                except Exception as exc:  # a failed step fails the requests in the engine, never the server
                    log.exception("engine step failed; the requests in the engine end with the error")
                    self._fail_all(exc)
            self._gauges()

    def _fail_all(self, exc: Exception) -> None:
        """Every job in the engine gets the error first (so none waits forever), then its request is
        dropped; an engine that cannot even abort (a broken device) does not stop the thread."""
        running = list(self._running.values())
        for job, request in running:
            self._end(job, request, exc)
        for _, request in running:
            try:
                self._engine.abort(request)
            except Exception:
                log.exception("aborting a failed request failed")

    def _step(self) -> None:
        for event in self._engine.step():
            job, request = self._running[event.request_id]  # every request in the engine is a job's
            if event.token_id is not None:
                self._metrics.completion_tokens.inc()
            job.put(event)
            if event.finish_reason is not None:
                self._end(job, request)
        self._step_metrics()

    def _take_jobs(self, block: bool) -> None:
        """New jobs into the engine: all that wait now, or, when the engine is idle, the next to come."""
        while True:
            try:
                job = self._jobs.get(block=block)
            except queue.Empty:
                return
            block = False
            if job is None:
                self._stopping = True
                return
            self._metrics.queued.dec()
            self._add(job)

    def _add(self, job: Job) -> None:
        if job.cancelled:
            job.put(JobAborted())
            self._forget(job)
            return
        try:
            ids = job.prompt_ids = job.prompt()
            if job.echo_scores is not None:
                job.prompt_scores = self._llm.prompt_logprobs(ids, job.echo_scores)
            request = self._engine.add_request(ids, job.params)
        except Exception as exc:  # handed to the request's handler, which maps it to an HTTP error
            job.put(exc)
            self._forget(job)
            return
        self._running[request.id] = (job, request)
        self._metrics.prompt_tokens.inc(len(ids))

    def _abort_cancelled(self) -> None:
        """Requests whose client left: dropped before the next step, so their KV blocks are free for it."""
        for job, request in [v for v in self._running.values() if v[0].cancelled]:
            self._engine.abort(request)
            self._end(job, request, JobAborted())

    def _end(self, job: Job, request, error: BaseException | None = None) -> None:
        if error is not None:
            job.put(error)
        del self._running[request.id]
        self._forget(job)

    def _forget(self, job: Job) -> None:
        with self._lock:
            self._live.discard(job)

    def _gauges(self) -> None:
        engine, m = self._engine, self._metrics
        m.running.set(len(engine.scheduler.running))
        m.waiting.set(len(engine.scheduler.waiting))
        m.kv_usage.set(engine.pool.used / max(engine.pool.capacity, 1))

    def _step_metrics(self) -> None:
        if self._engine.last_batch:
            self._metrics.step_batch.observe(self._engine.last_batch)
        # The store's counts of this step: an expert loaded once for several requests counts once.
        self._metrics.add_store_stats(self._engine.last_step_experts)
