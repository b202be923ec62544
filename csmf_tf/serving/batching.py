"""Server-side micro-batching of concurrent retrieval requests.

Concurrent ``serving_default`` requests are queued; a batching thread takes the first one, waits up to
``batch_timeout_s`` for more (up to ``max_batch_size`` rows), concatenates their batched inputs
(user features, per-row objective weights), runs the signature once with the largest ``k`` of the
batch and hands each request its own rows, cut to its own ``k``. This is TF Serving's
``--enable_batching`` idea: one ScaNN / matmul call over many queries amortises the per-call overhead.

A batch that fails (say one request had a NaN weight the host-side checks missed) is re-run request
by request, so one bad request never fails its neighbours.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Callable, Mapping, Protocol

import grpc
import numpy as np
import tensorflow as tf

from csmf_tf.serving.constants import (K_INPUT, OUTPUT_ITEM_IDS, OUTPUT_OBJECTIVE_SCORES, OUTPUT_SCORES,
                                       WEIGHTS_INPUT)
from csmf_tf.serving.errors import ServingError, from_tf_error
from csmf_tf.serving.signatures import SignatureInfo

log = logging.getLogger(__name__)

#: Outputs shaped [B, k, ...]: each request gets only its own first k columns.
K_OUTPUTS = frozenset({OUTPUT_ITEM_IDS, OUTPUT_SCORES, OUTPUT_OBJECTIVE_SCORES})


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """Micro-batching knobs (TF Serving's ``BatchingParameters`` equivalents)."""

    max_batch_size: int = 64          # rows per executed batch
    batch_timeout_s: float = 0.002    # how long a batch's first request waits for company
    max_enqueued: int = 1024          # queued requests beyond which requests get UNAVAILABLE
    num_batch_threads: int = 1

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_enqueued < 1 or self.num_batch_threads < 1:
            raise ValueError("max_batch_size, max_enqueued and num_batch_threads must be >= 1")
        if self.batch_timeout_s < 0:
            raise ValueError("batch_timeout_s must be >= 0")


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _waited_too_long() -> ServingError:
    return ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while waiting for the batch")


class _Task:
    """One queued request. A blocking caller waits on ``future``; a coroutine on ``waiter``, an asyncio
    future of its own ``loop`` that only that loop's thread touches."""

    __slots__ = ("inputs", "rows", "k", "key", "future", "deadline", "cancelled", "loop", "waiter", "queued_at")

    def __init__(self, inputs: dict[str, np.ndarray], rows: int, k: int | None, key: tuple,
                 deadline: float | None) -> None:
        self.inputs = inputs
        self.rows = rows
        self.k = k
        self.key = key
        self.future: concurrent.futures.Future | None = None
        self.deadline = deadline
        self.cancelled = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiter: asyncio.Future | None = None
        self.queued_at: float | None = None     # monotonic time it entered the queue (None: run inline)

    def claim(self) -> bool:
        """Whether the batch should still run this request (its waiter has not given up)."""
        if self.cancelled:
            return False
        return self.waiter is not None or self.future.set_running_or_notify_cancel()


def _settle_waiters(outcomes: list[tuple[_Task, object, BaseException | None]]) -> None:
    """Runs on an event loop: hand a batch's coroutines their results (skipping those that gave up)."""
    for task, value, error in outcomes:
        if task.waiter.done():
            continue
        if error is None:
            task.waiter.set_result(value)
        else:
            task.waiter.set_exception(error)


def _expire(task: _Task) -> None:
    """The deadline timer of a queued coroutine (runs on its loop)."""
    if not task.waiter.done():
        task.cancelled = True
        task.waiter.set_exception(_waited_too_long())


RunFn = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


class BatchObserver(Protocol):
    """Where a batcher reports what it does (:class:`csmf_tf.serving.monitoring.BatchMetrics`)."""

    def ran(self, rows: int, seconds: float) -> None:
        """One graph run of ``rows`` rows took ``seconds`` (wall time, failed runs included)."""

    def waited(self, seconds: float) -> None:
        """A request waited ``seconds`` in the queue before a batch took it."""


class RetrievalBatcher:
    """Queue + batching threads in front of one loaded signature (see module docstring).

    ``run`` executes the signature on validated inputs (defaults filled in, see
    :func:`csmf_tf.serving.validation.validate_request`) and returns numpy outputs.
    """

    def __init__(self, run: RunFn, signature: SignatureInfo, options: BatchingOptions,
                 name: str = "batcher", observer: BatchObserver | None = None) -> None:
        self._run = run
        self._observer = observer         # metrics: every graph run and every queued request's wait
        self._sig = signature
        self._options = options
        self._queue: queue.Queue[_Task] = queue.Queue(maxsize=options.max_enqueued)
        self._stopping = threading.Event()
        self._active = 0                  # submit() calls waiting for a result right now
        self._active_lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
                         for i in range(options.num_batch_threads)]
        self.batches_run = 0      # executed batches (observability / tests)
        self.max_rows_seen = 0    # largest batch executed
        self.inline_runs = 0      # requests run directly because nothing else was waiting
        for t in self._threads:
            t.start()

    # -- request side ------------------------------------------------------------------------------
    def _prepare(self, inputs: dict[str, np.ndarray], rows: int) -> _Task:
        """Normalise a validated request: weights to [rows, S], k to an int, a compatibility key."""
        inputs = dict(inputs)
        k = int(inputs.pop(K_INPUT)) if K_INPUT in inputs else None
        if WEIGHTS_INPUT in inputs:
            w = np.asarray(inputs[WEIGHTS_INPUT], np.float32)
            w = w.reshape(-1, w.shape[-1])
            inputs[WEIGHTS_INPUT] = w if w.shape[0] == rows else np.broadcast_to(w, (rows, w.shape[1]))
        # The validated inputs come in the signature's order, so equal layouts give equal keys.
        key_parts = []
        specs = self._sig.inputs
        for name, value in inputs.items():
            spec = specs.get(name)
            if name == WEIGHTS_INPUT or (spec is not None and spec.batched):
                key_parts.append((name, value.dtype.str, value.shape[1:]))
            else:
                # Unbatched extra inputs must be identical for requests to share a run.
                key_parts.append((name, value.dtype.str, value.shape, value.tobytes()))
        return _Task(inputs, rows, k, tuple(key_parts), None)

    def submit(self, inputs: dict[str, np.ndarray], rows: int, deadline: float | None) -> dict[str, np.ndarray]:
        """Run one request through the batch queue; blocks until done or ``deadline`` (monotonic)."""
        task = self._prepare(inputs, rows)
        task.deadline = deadline
        task.future = concurrent.futures.Future()
        if self._stopping.is_set():
            return self._execute_one(task)   # a straggler after shutdown: run it directly
        # Counted before it is queued, so a batching thread never believes it is alone by mistake.
        with self._active_lock:
            idle = self._active == 0 and self._queue.empty()
            self._active += 1
        try:
            if idle:
                # Nobody to batch with: run in the caller's thread and skip two thread hand-offs
                # (each can cost a GIL switch interval, ~5 ms, on a busy interpreter). Requests that
                # arrive meanwhile queue up and are batched together.
                self.inline_runs += 1
                return self._execute_one(task)
            self._enqueue(task)
            try:
                return task.future.result(timeout=_remaining(deadline))
            except concurrent.futures.TimeoutError:
                task.cancelled = True
                raise _waited_too_long() from None
        finally:
            with self._active_lock:
                self._active -= 1

    async def submit_async(self, inputs: dict[str, np.ndarray], rows: int, deadline: float | None
                           ) -> dict[str, np.ndarray]:
        """:meth:`submit` for a coroutine on an event loop: awaits the batch instead of blocking.

        The request is always queued: running it inline, as :meth:`submit` does when the batcher is
        idle, would stop the event loop (and every other request it is decoding) for the whole call.
        The result comes back through an asyncio future of this loop, set by one loop callback per batch
        (not one cross-thread wake-up per request), and the deadline is one timer on the loop.
        """
        task = self._prepare(inputs, rows)
        task.deadline = deadline
        loop = asyncio.get_running_loop()
        if self._stopping.is_set():
            return await loop.run_in_executor(None, self._execute_one, task)
        task.loop, task.waiter = loop, loop.create_future()
        with self._active_lock:
            self._active += 1
        remaining = _remaining(deadline)
        timer = None if remaining is None else loop.call_later(remaining, _expire, task)
        try:
            self._enqueue(task)
            return await task.waiter
        except asyncio.CancelledError:
            task.cancelled = True         # the RPC was cancelled: the batch skips it
            raise
        finally:
            if timer is not None:
                timer.cancel()
            with self._active_lock:
                self._active -= 1

    def _enqueue(self, task: _Task) -> None:
        task.queued_at = time.monotonic()
        try:
            self._queue.put_nowait(task)
        except queue.Full:
            raise ServingError(grpc.StatusCode.UNAVAILABLE, "the batch scheduling queue to which this "
                               "task was submitted is full") from None

    # -- batching threads --------------------------------------------------------------------------
    def _loop(self) -> None:
        pending: collections.deque[_Task] = collections.deque()
        limit = self._options.max_batch_size
        while True:
            if pending:
                first = pending.popleft()
            else:
                try:
                    first = self._queue.get(timeout=0.05)
                except queue.Empty:
                    if self._stopping.is_set():
                        return
                    continue
            batch, rows = [first], first.rows
            for t in list(pending):
                if t.key == first.key and rows + t.rows <= limit:
                    pending.remove(t)
                    batch.append(t)
                    rows += t.rows
            # As in TF Serving, the timeout runs from the first request's arrival, not from when this
            # thread got to it: requests that queued behind a running batch go at once.
            close_at = (first.queued_at or time.monotonic()) + self._options.batch_timeout_s
            while rows < limit:
                if self._queue.empty() and self._active <= len(batch) + len(pending):
                    # Every waiting request is already in this batch (or set aside): waiting could
                    # only add the batch timeout to their latency (e.g. one client at a time).
                    break
                remaining = close_at - time.monotonic()
                try:
                    t = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if t.key == first.key and rows + t.rows <= limit:
                    batch.append(t)
                    rows += t.rows
                else:
                    pending.append(t)   # runs in a later batch, in arrival order
                    if remaining <= 0:
                        break
            self._execute(batch)

    def _execute_one(self, task: _Task) -> dict[str, np.ndarray]:
        inputs = dict(task.inputs)
        if task.k is not None:
            inputs[K_INPUT] = np.asarray(task.k, np.int32)
        try:
            return self._timed_run(inputs, task.rows)
        except tf.errors.OpError as e:
            raise from_tf_error(e) from None

    def _execute(self, batch: list[_Task]) -> None:
        now = time.monotonic()
        live, outcomes = [], []
        for t in batch:
            # A waiter that gave up (deadline, cancelled RPC) is skipped; once claimed, a blocking
            # caller's future can no longer be cancelled, so setting its result below cannot fail.
            if not t.claim():
                continue
            if self._observer is not None and t.queued_at is not None:
                self._observer.waited(now - t.queued_at)
            if t.deadline is not None and now > t.deadline:
                outcomes.append((t, None, ServingError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                                       "deadline exceeded before the batch ran")))
                continue
            live.append(t)
        if len(live) == 1:
            outcomes.append(self._run_alone(live[0]))
        elif live:
            outcomes.extend(self._run_batch(live))
        self._settle(outcomes)

    def _run_batch(self, live: list[_Task]) -> list[tuple[_Task, object, BaseException | None]]:
        inputs = {name: np.concatenate([t.inputs[name] for t in live], axis=0)
                  if name == WEIGHTS_INPUT or (name in self._sig.inputs and self._sig.inputs[name].batched)
                  else live[0].inputs[name]
                  for name in live[0].inputs}
        ks = [t.k for t in live]
        if ks[0] is not None:
            inputs[K_INPUT] = np.asarray(max(ks), np.int32)
        try:
            outputs = self._timed_run(inputs, sum(t.rows for t in live))
        except Exception as e:  # noqa: BLE001 - isolate the culprit by re-running one by one
            log.debug("batch of %d failed (%s); re-running requests one by one", len(live), e)
            return [self._run_alone(t) for t in live]
        self.batches_run += 1
        self.max_rows_seen = max(self.max_rows_seen, sum(t.rows for t in live))
        outcomes, start = [], 0
        for t in live:
            part = {}
            for name, value in outputs.items():
                spec = self._sig.outputs.get(name)
                if spec is not None and spec.shape is not None and len(spec.shape) == 0:
                    part[name] = value
                    continue
                v = value[start:start + t.rows]
                if name in K_OUTPUTS and t.k is not None and v.ndim >= 2:
                    v = v[:, :t.k]
                part[name] = v
            start += t.rows
            outcomes.append((t, part, None))
        return outcomes

    def _run_alone(self, task: _Task) -> tuple[_Task, object, BaseException | None]:
        try:
            outcome = (task, self._execute_one(task), None)
        except Exception as e:  # noqa: BLE001 - every failure goes back to its own request
            outcome = (task, None, e)
        self.batches_run += 1
        self.max_rows_seen = max(self.max_rows_seen, task.rows)
        return outcome

    @staticmethod
    def _settle(outcomes: list[tuple[_Task, object, BaseException | None]]) -> None:
        """Hand every request its outcome: blocking callers through their futures, coroutines through one
        callback per event loop (one cross-thread wake-up per batch, not per request)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for outcome in outcomes:
            task, value, error = outcome
            if task.waiter is not None:
                by_loop.setdefault(task.loop, []).append(outcome)
            elif error is None:
                task.future.set_result(value)
            else:
                task.future.set_exception(error)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle_waiters, items)
            except RuntimeError:      # the loop is closed: nobody is waiting any more
                pass

    def _timed_run(self, inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        """One graph run, reported to the observer with its rows and wall time (also when it fails)."""
        started = time.perf_counter()
        try:
            return self._run(inputs)
        finally:
            if self._observer is not None:
                self._observer.ran(rows, time.perf_counter() - started)

    @property
    def queue_depth(self) -> int:
        """Requests waiting in the queue for a batching thread to take them."""
        return self._queue.qsize()

    def stop(self, timeout: float = 30.0) -> bool:
        """Finish queued work, then stop the threads; False when a thread is still running after ``timeout``."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)
