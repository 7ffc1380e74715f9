"""Canonical frames of many crystals at once, shared with worker processes on idle cores.

A frame's cost is moyopy's symmetry search (skipped for a crystal proven P1) plus a thin layer of
bookkeeping, ~65 µs per crystal of the MP-like mix on one core, and moyopy holds the GIL, so threads
cannot share it. On a machine with
idle cores (a GPU node, where the model no longer runs on the CPU) it is expected to be the part of a
screening run that does not scale with the hardware (not yet measured on GPU). :func:`canonical_frames` therefore splits
a call's crystals between this process and worker processes (``python -m
e3relax_fast.frame_workers``), in shares weighted by atom count, and each side computes its share
with :func:`~e3relax_fast.frame.canonical_frame`: the same code on the same library, so a frame
built by a worker is the frame built here, bit for bit.

Workers start in the background the first time a call has at least :data:`MIN_CRYSTALS` crystals
and live as long as this process; a call uses the workers that are ready and computes the rest
itself, so no call waits for a worker to start, and a worker that fails (dies, or its answer cannot
be read) is dropped and its share computed here. The protocol is length-prefixed pickles over the
child's stdin/stdout; the child writes nothing else there. Each worker imports the package (torch
included): ~1 s of a core to start and ~230 MB resident here.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import fields

import numpy as np

from .frame import CanonicalFrame, FrameError, canonical_frame

__all__ = ["MAX_WORKERS", "MIN_CORES", "MIN_CRYSTALS", "canonical_frames", "default_workers", "shutdown", "start"]

#: A call with fewer crystals builds its frames here: sending them to a worker and back costs more
#: than the work it saves, and starting a worker costs ~1 s of a core (Python and torch imports).
MIN_CRYSTALS = 64
#: ``"auto"`` uses at most this many workers (one core each) ...
MAX_WORKERS = 8
#: ... and starts them only when this process has at least this many cores to itself.
MIN_CORES = 4

_LOG = logging.getLogger(__name__)
_HEADER = struct.Struct("<Q")  # byte length of the pickle that follows


def default_workers() -> int:
    """The workers ``"auto"`` asks for: one per core this process may use beyond its own (its share
    when a ``torchrun`` job runs ``LOCAL_WORLD_SIZE`` ranks on the machine), at most
    :data:`MAX_WORKERS`; none below :data:`MIN_CORES` cores. On the shared 2-core virtual machine
    this was developed on, one worker was a gain in back-to-back calls (frames of 320 crystals: 44
    -> 27-32 ms) and a loss in a benchmark's interleaved rounds (median 66 -> 435 ms): a virtual
    core left idle for seconds runs several times slower for a while after it wakes, and the
    worker's core is idle between calls. Small machines are where such sharing is likeliest, so
    there workers are asked for by number."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    per_rank = cores // ranks
    return 0 if per_rank < MIN_CORES else min(MAX_WORKERS, per_rank - 1)


def canonical_frames(triples: list, symprec: float, workers: int | str = "auto") -> list:
    """The canonical frame of each crystal, or the :class:`FrameError` that says why it has none.

    Args:
        triples: ``(atomic_numbers (n,), positions (n, 3) Å, cell (3, 3) Å)`` per crystal.
        symprec: symmetry tolerance in Å (as :func:`~e3relax_fast.frame.canonical_frame`).
        workers: worker processes to share the work with: ``"auto"`` (:func:`default_workers`, when
            the call has at least :data:`MIN_CRYSTALS` crystals), ``0`` (all here) or a number.

    Returns:
        one :class:`~e3relax_fast.frame.CanonicalFrame` or :class:`FrameError` per crystal, in order.
    """
    wanted = _wanted(workers, len(triples))
    ready = _POOL.acquire(wanted) if wanted and triples else []
    try:
        return _split(triples, symprec, ready)
    finally:
        if ready:
            _POOL.release()


def start(workers: int | str = "auto", timeout: float = 0.0) -> int:
    """Start the worker processes ahead of the first large call (a benchmark's warm-up, a screening
    run's start) and wait up to ``timeout`` seconds for them to be ready; returns how many are."""
    wanted = _wanted(workers, MIN_CRYSTALS)
    deadline = time.monotonic() + timeout
    while True:
        ready = _POOL.acquire(wanted) if wanted else []
        if ready:
            _POOL.release()
        if len(ready) >= wanted or time.monotonic() >= deadline:
            return len(ready)
        time.sleep(0.05)


def shutdown() -> None:
    """Stop the worker processes (they are started again when needed; also done at exit)."""
    _POOL.close()


def _wanted(workers: int | str, n: int) -> int:
    if workers == "auto":
        return default_workers() if n >= MIN_CRYSTALS else 0
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"frame_workers must be 'auto' or a number >= 0, got {workers!r}")
    return workers


def _frames_here(triples: list, symprec: float) -> list:
    out = []
    for z, positions, cell in triples:
        try:
            out.append(canonical_frame(z, positions, cell, symprec))
        except FrameError as err:
            out.append(err)
    return out


#: Costs per crystal relative to building its frame, measured on the MP-like mix: a worker also
#: packs and pickles its frames, this process unpickles and unpacks them (~0.05 each). They set
#: the shares below.
_PICKLE_COST, _UNPICKLE_COST = 0.05, 0.05


def _split(triples: list, symprec: float, workers: list[_Worker]) -> list:
    """Shares by estimated cost (a fixed part per crystal plus one per atom: moyopy's search and the
    bookkeeping grow with the atoms), balanced so that every side finishes together: this process
    builds its share and unpickles the others', each worker builds and pickles its own."""
    if not workers:
        return _frames_here(triples, symprec)
    n = len(workers)
    worker_cost = (1.0 + _PICKLE_COST) / n
    mine = max(0.0, (worker_cost - _UNPICKLE_COST) / (1.0 - _UNPICKLE_COST + worker_cost))
    weights = np.array([mine] + [(1.0 - mine) / n] * n)
    cost = np.cumsum([16.0 + len(t[0]) for t in triples])
    shares = np.split(np.arange(len(triples)), np.searchsorted(cost, np.cumsum(weights)[:-1] * cost[-1]))
    sent = [(worker, share) for worker, share in zip(workers, shares[1:], strict=True)
            if len(share) and worker.send([triples[i] for i in share], symprec)]
    results: list = [None] * len(triples)
    try:
        for i, frame in zip(shares[0], _frames_here([triples[i] for i in shares[0]], symprec), strict=True):
            results[i] = frame
        for worker, share in sent:
            frames = worker.receive(len(share))
            if frames is None:  # the worker failed: its share is computed here
                frames = _frames_here([triples[i] for i in share], symprec)
            for i, frame in zip(share, frames, strict=True):
                results[i] = frame
    except BaseException:
        # Interrupted (Ctrl-C, an error here): a worker whose answer was not read would give it to
        # the next call, so those are stopped.
        for worker, _ in sent:
            if worker.pending is not None:
                worker.stop("its answer was left unread")
        raise
    unsent = [i for i, r in enumerate(results) if r is None]  # shares no worker could be sent
    for i, frame in zip(unsent, _frames_here([triples[i] for i in unsent], symprec), strict=True):
        results[i] = frame
    return results


_FIELDS = [f.name for f in fields(CanonicalFrame)]


def _pack(results: list) -> tuple[dict, dict]:
    """A worker's answer in a form that pickles in one piece: each array field of the frames
    concatenated (flat) with its shapes, the other fields as lists; the failures by position. (Pickling
    frame by frame costs ~30 µs per frame, a fifth of building it; this costs ~6.)"""
    frames = [r for r in results if isinstance(r, CanonicalFrame)]
    columns = {}
    for name in _FIELDS:
        values = [getattr(f, name) for f in frames]
        if values and isinstance(values[0], np.ndarray):
            columns[name] = (np.concatenate([v.ravel() for v in values]), [v.shape for v in values])
        else:
            columns[name] = (values, None)
    return columns, {k: str(r) for k, r in enumerate(results) if isinstance(r, FrameError)}


def _unpack(columns: dict, failures: dict) -> list:
    """The inverse of :func:`_pack`: frames whose arrays are views of the concatenated ones."""
    values = []
    for name in _FIELDS:
        data, shapes = columns[name]
        if shapes is None:
            values.append(data)
            continue
        column, start = [], 0
        for end, shape in zip(itertools.accumulate(map(math.prod, shapes)), shapes, strict=True):
            column.append(data[start:end].reshape(shape))
            start = end
        values.append(column)
    frames = iter(itertools.starmap(CanonicalFrame, zip(*values, strict=True)))
    n = len(values[0]) + len(failures)
    return [FrameError(failures[k]) if k in failures else next(frames) for k in range(n)]


class _Worker:
    """One child process: starts in the background, says it is ready, answers requests in order."""

    def __init__(self) -> None:
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                   # this very package, whatever put it on this process's path
                   PYTHONPATH=os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])]))
        self.process = subprocess.Popen([sys.executable, "-m", "e3relax_fast.frame_workers"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        self.state = "starting"
        self.requests = 0
        self.pending: int | None = None  # the number of the request whose answer has not been read

    def ready(self) -> bool:
        """Whether the worker has said it is ready (never waits); a worker whose handshake names
        another copy of the package is stopped."""
        if self.state != "starting":
            return self.state == "ready"
        readable, _, _ = select.select([self.process.stdout], [], [], 0)  # its handshake, or its end
        if not readable:
            return False
        try:
            handshake = self._read()
        except Exception as err:  # it exited while starting (EOF) or wrote something else
            self.stop(f"no handshake: {err}")
            return False
        if handshake != os.path.abspath(__file__):
            self.stop("runs another copy of the package")
            return False
        self.state = "ready"
        return True

    def send(self, triples: list, symprec: float) -> bool:
        self.requests += 1
        try:
            payload = pickle.dumps((self.requests, symprec, triples), protocol=pickle.HIGHEST_PROTOCOL)
            self.process.stdin.write(_HEADER.pack(len(payload)) + payload)
            self.process.stdin.flush()
            self.pending = self.requests
            return True
        except (OSError, ValueError) as err:
            self.stop(f"request failed: {err}")
            return False

    def receive(self, n: int) -> list | None:
        """The worker's frames for the last request, or ``None`` (and the worker stopped) if it failed."""
        try:
            number, columns, failures = self._read()
            frames = _unpack(columns, failures)
        except Exception as err:  # a dead worker, or any answer that is not frames: the share is built here
            self.stop(f"answer unreadable: {err}")
            return None
        if number != self.pending or len(frames) != n:
            self.stop(f"answered request {number} with {len(frames)} frames, not request {self.pending} with {n}")
            return None
        self.pending = None
        return frames

    def _read(self):
        header = self.process.stdout.read(_HEADER.size)
        if len(header) < _HEADER.size:
            raise EOFError("the worker exited")
        size = _HEADER.unpack(header)[0]
        payload = self.process.stdout.read(size)
        if len(payload) < size:
            raise EOFError("the worker exited")
        return pickle.loads(payload)

    def stop(self, why: str = "") -> None:
        if why:
            _LOG.debug("frame worker %d stopped: %s", self.process.pid, why)
        self.state = "stopped"
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=1.0)  # it exits at the end of its stdin
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class _Pool:
    """This process's workers. One call uses them at a time (a concurrent call computes its frames
    itself); a process forked from this one starts its own (the pipes are this process's)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.workers: list[_Worker] = []
        self.pid = os.getpid()

    def acquire(self, wanted: int) -> list[_Worker]:
        """The ready workers among the first ``wanted``, starting the missing ones (not waited for);
        the caller must :meth:`release` when it gets a non-empty list."""
        if not self.lock.acquire(blocking=False):
            return []
        if self.pid != os.getpid():
            self.workers, self.pid = [], os.getpid()
        self.workers = [w for w in self.workers if w.state != "stopped"]
        try:
            while len(self.workers) < wanted:
                self.workers.append(_Worker())
        except OSError as err:  # no process can be started here (limits): frames are built here
            _LOG.debug("frame worker not started: %s", err)
        ready = [w for w in self.workers[:wanted] if w.ready()]
        if not ready:
            self.lock.release()
        return ready

    def release(self) -> None:
        self.lock.release()

    def close(self) -> None:
        with self.lock:
            if self.pid == os.getpid():
                for worker in self.workers:
                    if worker.state != "stopped":
                        worker.stop()
            self.workers = []


_POOL = _Pool()


def _serve() -> None:
    """The worker's loop: the handshake (this module's path), then one answer per request until
    stdin ends. The protocol owns the original stdout; anything else written there goes to stderr."""
    # Ctrl-C reaches the whole process group: the caller decides what it means (this worker ends
    # with its stdin either way).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    stdin = sys.stdin.buffer

    def write(obj) -> None:
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        out.write(_HEADER.pack(len(payload)) + payload)
        out.flush()

    write(os.path.abspath(__file__))
    while True:
        header = stdin.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        number, symprec, triples = pickle.loads(stdin.read(_HEADER.unpack(header)[0]))
        write((number, *_pack(_frames_here(triples, symprec))))


if __name__ == "__main__":
    _serve()
else:
    atexit.register(shutdown)
