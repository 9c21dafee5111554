"""EngineLoop: one thread drives the scheduler and the stages; any thread submits, cancels and asks.

The loop's thread alone touches the scheduler, the block manager and the
executor, so none of them needs a lock. Other threads talk to it through an
inbox (a deque under a condition variable): add a request, cancel one, run a
function between steps (stats), stop. Between two steps the loop takes
everything in the inbox, so a new request joins the running batch at the
next step; when there is no work it sleeps on the condition (no polling).

A step: keep the pipeline full (a micro-batch per stage, plus one waiting at
stage 0), wait for the oldest step's sampled tokens, apply them (stop rules,
text), then hand each request's `RequestOutput` to its sink, after the
bookkeeping, so a caller woken by its last output sees its blocks returned.

Failures: a step that raised in this process (the one-stage executor) fails
only the requests of that step, and the loop goes on. StageFailed, or any
error of the loop itself, ends the loop: the stages are closed, every request
receives the error, and later submissions raise RuntimeError naming it.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from ..distributed.step import StepPlan
from ..errors import StageFailed
from ..params import SamplingParams
from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .requests import OutputSink, Request, RequestOutput
from .scheduler import Scheduler
from .sequence import Sequence
from .stats import Stats, snapshot

log = logging.getLogger("pprt")
CLOSE_TIMEOUT_S = 10.0  # close(): how long the loop may take to finish its step before the stages are killed


@dataclass(frozen=True, slots=True)
class _Add:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams  # resolved
    sink: OutputSink


@dataclass(frozen=True, slots=True)
class _Cancel:
    request_id: int


@dataclass(frozen=True, slots=True)
class _Call:
    fn: Callable[[], Any]
    future: Future


_STOP = object()


class EngineLoop:
    """The thread that serves every request of one LLM (see the module docstring)."""

    def __init__(self, executor, scheduler: Scheduler, tokenizer: Tokenizer | None):
        self.executor, self.scheduler, self.blocks = executor, scheduler, scheduler.blocks
        self.tokenizer = tokenizer
        self._cond = threading.Condition()
        self._inbox: deque = deque()
        self._ids = itertools.count()
        self.closed_reason: str | None = None  # set once no more requests are taken
        # the loop thread's own
        self._requests: dict[int, Request] = {}  # by request id (= sequence id)
        self._seqs: dict[int, Sequence] = {}  # sequences the loop still tracks (in flight after a cancel too)
        self._in_flight: deque[StepPlan] = deque()
        self._thread = threading.Thread(target=self._run, name="pprt-engine-loop", daemon=True)
        self._thread.start()

    # ---- any thread --------------------------------------------------------------------------
    def new_request_id(self) -> int:
        return next(self._ids)  # atomic: itertools.count holds the GIL while it counts

    def add(self, request_id: int, prompt_ids: list[int], params: SamplingParams, sink: OutputSink) -> None:
        """Queue a request (checked by the caller with Scheduler.check). Raises RuntimeError once closed."""
        self._post(_Add(request_id, prompt_ids, params, sink))

    def cancel(self, request_id: int) -> None:
        """End a request: its last output says "cancelled". Unknown or finished ids are ignored."""
        with self._cond:
            if self.closed_reason is None:
                self._inbox.append(_Cancel(request_id))
                self._cond.notify()

    def refuse_on_loop_thread(self, what: str) -> None:
        """Raise instead of waiting for the loop on its own thread (from an output sink): that never ends."""
        if threading.current_thread() is self._thread:
            raise RuntimeError(f"{what} waits for the engine loop: it cannot be called from an output callback, "
                               "which runs on the engine loop's thread")

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the loop's thread between two steps and return its result (or raise its error)."""
        self.refuse_on_loop_thread("this call")
        future: Future = Future()
        self._post(_Call(fn, future))
        return future.result()

    def stats(self) -> Stats:
        """A snapshot of the counters, taken on the loop's thread between two steps."""
        return self.call(lambda: snapshot(self.executor, self.scheduler))

    def close(self) -> None:
        """Stop taking requests, let the loop end (failing what is left) and close the stages."""
        with self._cond:
            if self.closed_reason is None:
                self.closed_reason = "this LLM is closed"
            self._inbox.append(_STOP)
            self._cond.notify()
        if threading.current_thread() is self._thread:
            return  # called from a sink: the loop ends after this step
        self._thread.join(CLOSE_TIMEOUT_S)
        executor = self.executor
        if self._thread.is_alive() and executor is not None:
            executor.kill()  # a long or stuck step: the loop sees its stages die and ends
            self._thread.join(CLOSE_TIMEOUT_S)

    def _post(self, msg) -> None:
        with self._cond:
            if self.closed_reason is not None:
                raise RuntimeError(self.closed_reason)
            self._inbox.append(msg)
            self._cond.notify()

    # ---- the loop's thread ------------------------------------------------------------------
    def _run(self) -> None:
        error = None
        try:
            self.executor.bind_thread()
            while self._take_inbox():
                if self.scheduler.has_work or self._in_flight:
                    self._step()
        except BaseException as e:  # StageFailed, or a bug: nothing can go on
            error = e
            if not isinstance(e, StageFailed):
                log.exception("the engine loop stopped")
        finally:
            self._end(error)

    def _take_inbox(self) -> bool:
        """Apply what other threads sent, sleeping while there is nothing to do. False: stop."""
        with self._cond:
            while not self._inbox and not (self.scheduler.has_work or self._in_flight):
                self._cond.wait()
            msgs = list(self._inbox)
            self._inbox.clear()
        for msg in msgs:
            if msg is _STOP:
                return False
            if isinstance(msg, _Add):
                self._admit(msg)
            elif isinstance(msg, _Cancel):
                self._cancel(msg.request_id)
            elif msg.future.set_running_or_notify_cancel():
                try:
                    msg.future.set_result(msg.fn())
                except Exception as e:
                    msg.future.set_exception(e)
        return True

    def _admit(self, msg: _Add) -> None:
        try:
            seq = self.scheduler.add(msg.prompt_ids, msg.params, seq_id=msg.request_id)
        except Exception as e:  # the caller checked it: only a change of settings since gets here
            _deliver(msg.sink, RequestOutput(msg.request_id, error=e))
            return
        detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        self._requests[seq.seq_id] = Request(seq, msg.sink, detok)
        self._seqs[seq.seq_id] = seq

    def _cancel(self, request_id: int) -> None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        self.scheduler.finish(req.seq, "cancelled")  # its blocks return once nothing of it is in flight
        self._forget_if_done(request_id)
        _deliver(req.sink, RequestOutput(request_id, completion=req.completion()))

    def _step(self) -> None:
        """Fill the pipeline, then apply the oldest step's tokens."""
        depth = self.executor.depth
        active = len(self.scheduler.running) + len(self.scheduler.waiting)
        group = max(1, math.ceil(active / depth))
        # A pipeline keeps one micro-batch more than it has stages in flight: the extra one
        # waits in stage 0's queue, so stage 0 does not idle while a result makes its way
        # back through the driver (bench/pipeline.py measured 6-8% idle per stage without).
        limit = depth + 1 if depth > 1 else 1
        while len(self._in_flight) < limit:
            plan = self.scheduler.schedule(max_seqs=group)
            if plan is None:
                break
            try:
                self.executor.submit(plan)
            except StageFailed:
                raise
            except Exception as e:  # the step did not run (the in-process stage raised): fail only its requests
                self._fail_plan(plan, e)
                return
            self._in_flight.append(plan)
        if not self._in_flight:
            raise RuntimeError("the scheduler has work but could not plan a step")
        result = self.executor.result()
        plan = self._in_flight.popleft()
        outputs = []
        for seq, new in self.scheduler.complete(plan, result, self._seqs):
            req = self._requests.get(seq.seq_id)
            if req is None:
                continue
            first = len(seq.output_ids) - new  # several tokens with speculative decoding
            for i in range(first, len(seq.output_ids)):
                token = seq.output_ids[i]
                last = i == len(seq.output_ids) - 1
                if req.push_token(token, self.scheduler.is_stop_token(seq, token), last=last):
                    self.scheduler.finish(seq, "stop")
                    seq.finish_reason = "stop"  # also when this token was the last one allowed
                    del seq.output_ids[i + 1:], seq.logprobs[i + 1:]  # tokens after the stop string
                    break
            out = req.output()
            if out is not None:
                outputs.append((req.sink, out))
                if out.finished:
                    del self._requests[seq.seq_id]
        for chunk in plan.chunks:
            self._forget_if_done(chunk.seq_id)
        for sink, out in outputs:
            _deliver(sink, out)

    def _fail_plan(self, plan: StepPlan, error: Exception) -> None:
        """End the requests of a step that raised before it ran; the others go on."""
        self.scheduler.abort(plan, self._seqs)
        for chunk in plan.chunks:
            seq = self._seqs[chunk.seq_id]
            seq.registered = True  # the stage may have taken it in before it raised: have it forget
            self.scheduler.finish(seq, "cancelled")
            req = self._requests.pop(seq.seq_id, None)
            self._forget_if_done(seq.seq_id)
            if req is not None:
                _deliver(req.sink, RequestOutput(req.id, error=error))

    def _forget_if_done(self, seq_id: int) -> None:
        """Drop a finished sequence once nothing of it is in flight."""
        seq = self._seqs.get(seq_id)
        if seq is not None and seq.finish_reason is not None and seq.in_flight == 0:
            del self._seqs[seq_id]

    def _end(self, error: BaseException | None) -> None:
        """Close the stages, then fail every request and call still waiting."""
        with self._cond:
            if self.closed_reason is None:
                self.closed_reason = f"this LLM is closed: {type(error).__name__}: {error}"
            left = list(self._inbox)
            self._inbox.clear()
        executor, self.executor = self.executor, None
        try:
            executor.close()
        except Exception:
            log.exception("closing the stages failed")
        reason = error if error is not None else RuntimeError("this LLM is closed")
        for req in self._requests.values():
            _deliver(req.sink, RequestOutput(req.id, error=reason))
        self._requests.clear()
        for msg in left:
            if isinstance(msg, _Add):
                _deliver(msg.sink, RequestOutput(msg.request_id, error=reason))
            elif isinstance(msg, _Call) and msg.future.set_running_or_notify_cancel():
                msg.future.set_exception(RuntimeError(self.closed_reason))


def _deliver(sink: OutputSink, out: RequestOutput) -> None:
    try:
        sink(out)
    except Exception:  # one caller's broken sink must not stop everyone's requests
        log.exception("the output sink of request %d raised", out.request_id)
