"""The cpu backend's threads: how many a call gets (scan_threads), and running a kernel's tasks on the
calling thread, helped by the pool's threads (_run_tasks, _TaskPool: no fork-join, so a busy core never
holds a call up). The kernels take their tasks from a shared counter; this module knows nothing else of
them. Also the note printed while a first call compiles.
"""

from __future__ import annotations

import atexit
import os
import queue
import sys
import threading

import numpy as np
import torch

#: (kernel, compute dtype) pairs that ran in this process; the first call of each may compile
_RAN: set = set()
#: a first call that takes longer than this is compiling: say so (a cached kernel loads in well under it)
COMPILE_NOTE_AFTER_S = 3.0


def _note_compiling() -> None:
    print("lbmamba: compiling the CPU scan kernels, once per machine (about a minute per dtype; numba caches them "
          "on disk)", file=sys.stderr, flush=True)


#: Below this many state updates (batch x dim x L x N, about 1 ns each on one core) a call runs on the
#: calling thread alone: waking a helper would cost more than it saves.
PARALLEL_MIN_WORK = 1 << 18


def scan_threads(batch: int, dim: int, seqlen: int, dstate: int) -> int:
    """Threads for one call: torch's count (what every other op of the model uses), or 1 for small calls."""
    return 1 if batch * dim * seqlen * dstate < PARALLEL_MIN_WORK else max(1, torch.get_num_threads())


def _run_tasks(loop, n_tasks: int, threads: int, *args, lone_counters_made_by_loop: bool = False) -> None:
    """Run tasks 0..n_tasks-1 of `loop` (_forward_at / _backward_kernel, which take tasks from a shared
    counter) on `threads` threads: the calling thread alone when one suffices, else with helpers from the
    pool. lone_counters_made_by_loop: on the calling thread alone, pass None for the counters (the loop
    makes them)."""
    helpers = min(threads, n_tasks) - 1
    key = (loop, args[-1].dtype)  # the last argument is always a compute-dtype array
    timer = None
    if key not in _RAN:  # nothing would tell the user why the first call takes a minute
        timer = threading.Timer(COMPILE_NOTE_AFTER_S, _note_compiling)
        timer.daemon = True
        timer.start()
    try:
        if helpers < 1:
            loop(None if lone_counters_made_by_loop else np.zeros(2, dtype=np.int64), n_tasks, *args)
        else:
            if key not in _RAN:  # compile on this thread first: helpers would each wait for the compiler
                loop(np.full(2, n_tasks, dtype=np.int64), n_tasks, *args)
            _POOL.run(loop, n_tasks, helpers, args)
        _RAN.add(key)
    finally:
        if timer is not None:
            timer.cancel()


class _Call:
    """One scan call's tasks, shared by the calling thread and any helper that turns up in time."""

    def __init__(self, loop, n_tasks: int, args: tuple):
        self.loop, self.n_tasks, self.args = loop, n_tasks, args
        self.counters = np.zeros(2, dtype=np.int64)  # tasks taken, tasks finished
        self.finished = threading.Event()  # set by the thread that finishes the last task
        self.error = None

    def work(self) -> None:
        """Take tasks until none is left (the kernels run without the GIL)."""
        try:
            if self.loop(self.counters, self.n_tasks, *self.args):
                self.finished.set()
        except BaseException as exc:  # never leave the caller waiting for a task that will not finish
            self.error = exc
            self.finished.set()


class _TaskPool:
    """Helper threads for the CPU scan, and why it does not use a parallel loop (OpenMP, numba's prange).

    A parallel loop is fork-join: the calling thread waits at the end until every thread of the team
    has arrived, even one that never got a core. When another process keeps a core busy, a woken
    thread waited about 8 ms for it, whatever the size of the call. Here the calling thread starts on
    the tasks at once and helpers take tasks from the same counter as they come free; the caller waits
    only for tasks a helper has started, never for a helper that has not shown up (it will find no
    task left and go back to sleep). A helper that the OS deschedules holds up at most its one task.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list = []
        self._pid = os.getpid()
        atexit.register(self.close)

    def run(self, loop, n_tasks: int, helpers: int, args: tuple) -> None:
        call = _Call(loop, n_tasks, args)
        self._ensure(helpers)
        for _ in range(helpers):
            self._queue.put(call)
        call.work()
        if call.counters[1] < n_tasks or call.error is not None:  # a helper is still in a task
            call.finished.wait()
        if call.error is not None:
            raise call.error

    def _ensure(self, helpers: int) -> None:
        with self._lock:
            if self._pid != os.getpid():  # a forked child has none of its parent's threads
                self._queue, self._threads, self._pid = queue.SimpleQueue(), [], os.getpid()
            while len(self._threads) < helpers:
                thread = threading.Thread(target=self._serve, args=(self._queue,), name="lbmamba-scan", daemon=True)
                thread.start()
                self._threads.append(thread)

    def close(self, timeout: float = 2.0) -> None:
        """Stop the helpers and wait for them (at exit). A helper that turned up late for a call that had
        already ended still enters the kernel once (it finds no task); doing that while the interpreter
        shuts down aborted the process ("PyThreadState_Get: ... the GIL is released")."""
        with self._lock:
            if self._pid != os.getpid():
                return
            threads, self._threads = self._threads, []
            for _ in threads:
                self._queue.put(None)
        for thread in threads:
            thread.join(timeout)

    @staticmethod
    def _serve(calls: queue.SimpleQueue) -> None:
        while (call := calls.get()) is not None:
            call.work()


_POOL = _TaskPool()
