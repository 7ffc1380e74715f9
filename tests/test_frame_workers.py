"""Canonical frames shared with worker processes (e3relax_fast/frame_workers.py): a frame built by a
worker is the frame built here, bit for bit; failures come back in their slot; a worker that dies
or answers nonsense costs nothing but time; relax_batch gives the same answer with and without."""

from __future__ import annotations

import select
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("moyopy")
ase_io = pytest.importorskip("ase.io")

from e3relax_fast import frame_workers, relax_batch  # noqa: E402
from e3relax_fast.frame import CanonicalFrame, FrameError, canonical_frame  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SYMPREC = 1e-3


@pytest.fixture(scope="module")
def crystals() -> list:
    """80 crystals: symmetric seeds (many space groups), rattled copies (P1), 2x1x1 supercells, and
    two with overlapping atoms (no frame)."""
    rng = np.random.default_rng(7)
    seeds = ase_io.read(ROOT / "data/seeds/aflow_decorated.extxyz", index=":40")
    out = []
    for k, atoms in enumerate(seeds):
        z, pos, cell = atoms.numbers.astype(np.int64), atoms.positions.copy(), atoms.cell.array.copy()
        out.append((z, pos, cell))
        if k % 2:
            out.append((z, pos + rng.normal(scale=0.05, size=pos.shape), cell))
        else:
            out.append((np.tile(z, 2), np.vstack([pos, pos + cell[0]]), cell * np.array([[2.0], [1.0], [1.0]])))
    out[5] = (np.array([8, 8]), np.zeros((2, 3)), 4.0 * np.eye(3))
    out[60] = (np.array([1, 1, 1]), np.array([[0.0, 0, 0], [1, 1, 1], [1, 1, 1]]), 3.0 * np.eye(3))
    return out


@pytest.fixture(scope="module")
def worker():
    """One worker process, ready (started for this module, stopped after it)."""
    frame_workers.shutdown()
    assert frame_workers.start(1, timeout=120.0) == 1, "the frame worker process did not start within 120 s"
    yield
    frame_workers.shutdown()


def same_frame(a, b) -> bool:
    if isinstance(a, FrameError) or isinstance(b, FrameError):
        return type(a) is type(b) and str(a) == str(b)
    return all(np.array_equal(getattr(a, f.name), getattr(b, f.name)) and
               np.asarray(getattr(a, f.name)).dtype == np.asarray(getattr(b, f.name)).dtype for f in fields(a))


def frames_here(triples) -> list:
    out = []
    for t in triples:
        try:
            out.append(canonical_frame(*t, symprec=SYMPREC))
        except FrameError as err:
            out.append(err)
    return out


def test_worker_frames_are_the_frames_built_here(crystals, worker):
    shared = frame_workers.canonical_frames(crystals, SYMPREC, workers=1)
    assert [w.state for w in frame_workers._POOL.workers] == ["ready"]  # the worker took part, and is still up
    here = frames_here(crystals)
    assert len(shared) == len(crystals)
    assert sum(isinstance(f, FrameError) for f in here) == 2
    assert {f.spacegroup for f in here if isinstance(f, CanonicalFrame)} >= {1, 221, 227}  # P1 and cubic among them
    for k, (a, b) in enumerate(zip(shared, here, strict=True)):
        assert same_frame(a, b), f"crystal {k}: the worker's frame differs from the one built here"


def test_worker_share_is_not_empty(crystals, worker, monkeypatch):
    """The split gives the worker a share (else the test above compares this process with itself)."""
    sent = []
    original = frame_workers._Worker.send

    def send(self, triples, symprec):
        sent.append(len(triples))
        return original(self, triples, symprec)

    monkeypatch.setattr(frame_workers._Worker, "send", send)
    frame_workers.canonical_frames(crystals, SYMPREC, workers=1)
    assert len(sent) == 1 and 0.25 * len(crystals) < sent[0] < 0.75 * len(crystals)


def test_a_dead_worker_costs_only_time(crystals, worker):
    [w] = frame_workers._POOL.workers
    w.process.kill()
    w.process.wait()
    shared = frame_workers.canonical_frames(crystals, SYMPREC, workers=1)
    assert all(same_frame(a, b) for a, b in zip(shared, frames_here(crystals), strict=True))
    assert w.state == "stopped"
    assert frame_workers.start(1, timeout=120.0) == 1  # a new one replaces it


def test_a_worker_that_ends_its_output_while_starting_is_dropped(crystals, monkeypatch, tmp_path):
    """Before: its end of output, read as the handshake, raised EOFError out of relax_batch."""
    frame_workers.shutdown()
    fake = tmp_path / "python"
    # Alive, its output closed, no handshake; closed half a second in, so that acquire's own first look
    # (right after the start) still finds it starting (without the pause it could already find the end
    # and drop the worker, and the look below would find a closed pipe).
    fake.write_text("#!/bin/sh\nsleep 0.5\nexec 1>&-\nsleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setattr(frame_workers.sys, "executable", str(fake))
    frame_workers._POOL.acquire(1)  # started, not ready yet
    [w] = frame_workers._POOL.workers
    assert w.state == "starting"
    assert select.select([w.process.stdout], [], [], 30.0)[0]  # its output has ended
    got = frame_workers.canonical_frames(crystals, SYMPREC, workers=1)
    assert w.state == "stopped"
    assert all(same_frame(a, b) for a, b in zip(got, frames_here(crystals), strict=True))
    monkeypatch.undo()
    assert frame_workers.start(1, timeout=120.0) == 1  # the module's worker again, for the tests below


@pytest.mark.parametrize("answer", [["not a frame"], (1, {"numbers": (np.zeros(3), [(3,)])}, {}), (1, {}, {0: "x"})])
def test_a_nonsense_answer_costs_only_time(crystals, worker, monkeypatch, answer):
    monkeypatch.setattr(frame_workers._Worker, "_read", lambda self: answer)
    shared = frame_workers.canonical_frames(crystals, SYMPREC, workers=1)
    assert all(same_frame(a, b) for a, b in zip(shared, frames_here(crystals), strict=True))
    monkeypatch.undo()
    assert frame_workers.start(1, timeout=120.0) == 1


def test_an_interrupted_call_leaves_no_answer_for_the_next(crystals, worker, monkeypatch):
    """Interrupted after sending its share (here: an error while this process builds its own), a
    call stops the worker, whose answer would otherwise go to the next call of the same size."""
    original = frame_workers._frames_here
    monkeypatch.setattr(frame_workers, "_frames_here", lambda t, s: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        frame_workers.canonical_frames(crystals, SYMPREC, workers=1)
    [w] = frame_workers._POOL.workers
    assert w.state == "stopped"
    monkeypatch.setattr(frame_workers, "_frames_here", original)
    assert frame_workers.start(1, timeout=120.0) == 1
    shifted = [(z, pos + 0.1, cell) for z, pos, cell in crystals]  # same size, other crystals
    got = frame_workers.canonical_frames(shifted, SYMPREC, workers=1)
    assert all(same_frame(a, b) for a, b in zip(got, frames_here(shifted), strict=True))


def test_an_answer_to_another_request_is_refused(crystals, worker, monkeypatch):
    original = frame_workers._Worker._read
    monkeypatch.setattr(frame_workers._Worker, "_read", lambda self: (0, *original(self)[1:]))
    got = frame_workers.canonical_frames(crystals, SYMPREC, workers=1)
    assert all(same_frame(a, b) for a, b in zip(got, frames_here(crystals), strict=True))
    assert frame_workers._POOL.workers[0].state == "stopped"
    monkeypatch.undo()
    assert frame_workers.start(1, timeout=120.0) == 1


def test_relax_batch_same_answer_with_and_without_workers(crystals, worker):
    kw = dict(on_error="skip", dtype=None)
    with pytest.warns(UserWarning):  # the two crystals with overlapping atoms are reported
        with_workers = relax_batch(crystals, frame_workers=1, **kw)
    with pytest.warns(UserWarning):
        without = relax_batch(crystals, frame_workers=0, **kw)
    assert with_workers.errors == without.errors and set(with_workers.errors) == {5, 60}
    for a, b in zip(with_workers, without, strict=True):
        if a is None:
            assert b is None
            continue
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[2], b[2])


def test_no_crystals_no_work(worker):
    assert frame_workers.canonical_frames([], SYMPREC, workers=1) == []


@pytest.mark.parametrize("bad", [-1, "two", True, 1.5])
def test_bad_frame_workers_is_refused(bad):
    with pytest.raises(ValueError, match="frame_workers"):
        frame_workers.canonical_frames([], SYMPREC, workers=bad)


def test_default_workers_share_the_cores_among_local_ranks(monkeypatch):
    monkeypatch.setattr(frame_workers.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert frame_workers.default_workers() == frame_workers.MAX_WORKERS
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert frame_workers.default_workers() == 7
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert frame_workers.default_workers() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 2 cores per rank: below MIN_CORES
    assert frame_workers.default_workers() == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(frame_workers.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert frame_workers.default_workers() == 0


def test_small_calls_stay_in_this_process(monkeypatch):
    started = []
    monkeypatch.setattr(frame_workers._Pool, "acquire", lambda self, wanted: started.append(wanted) or [])
    frame_workers.canonical_frames([(np.array([14]), np.zeros((1, 3)), 3.0 * np.eye(3))] * 3, SYMPREC)
    assert started == []  # "auto" and fewer than MIN_CRYSTALS: no worker asked for
