"""Screening many structure files with nothing lost: the workflow behind ``e3relax-fast relax``.

- **Inputs**: files, folders (every structure file inside, recursively; see
  :func:`~e3relax_fast.io.read.is_structure_file`) and glob patterns, in that order, each file once;
  folders and patterns leave out earlier outputs (``*_relaxed*``).
- **Outputs**: per input file, ``<stem>_relaxed.<ext>`` in the input's format (CIF -> CIF, POSCAR ->
  POSCAR, extxyz/xyz -> extxyz, ASE trajectory and database -> the same; anything else -> extxyz), or
  the format asked for; next to the input, or under ``outdir`` (a folder's files keep their paths
  relative to it). A multi-frame output is aligned with its input: frame k is input frame k; a frame
  that failed is the input frame with ``info["relax_status"] = "failed"`` and ``info["relax_error"]``
  (every frame carries ``relax_status``). A single-structure output that failed is not written
  (``on_error="return_input"``: the input is).
- **Manifest**: one JSON line per structure, ``{"input", "frame", "output", "status", "reason",
  "seconds"}`` (``status`` relaxed or failed; ``frame`` null for an unreadable file; ``seconds``: its
  chunk's wall time shared out; ``uncertainty`` and ``warning`` where there are some; a chunk's
  structures are first recorded ``started``). A re-run reads it and skips every structure recorded
  ``relaxed`` (failures are tried again), so a run killed at any moment resumes where it stopped;
  ``overwrite=True`` starts afresh. Resuming assumes the same inputs and ``chunk``.
- **Work**: structures go to :func:`~e3relax_fast.relax.relax_batch` in chunks of ``chunk``
  structures (whole files, or segments of ``chunk`` frames of a multi-frame file); after each chunk
  its outputs are written (whole files, atomically) and then its manifest lines (flushed to disk), so
  outputs and manifest always agree. A multi-frame file's segments are written as hidden part files
  (``.<output>.frames<start>-<stop>.extxyz`` beside the output) and assembled into the output at the
  end.
- **Several processes** (``torchrun --nproc-per-node N -m e3relax_fast relax ...``): whole files are
  dealt to the ranks in turn and so are the segments of multi-frame files (every rank reads those);
  each rank writes its own outputs, parts and manifest part (``<manifest>.part<rank>``); after a
  barrier rank 0 merges the manifest parts (one line per structure, in input order) and assembles
  the multi-frame outputs. The result is the single process's.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .io import (
    FORMATS,
    MULTI_FRAME_FORMATS,
    SINGLE_STRUCTURE_FORMATS,
    UnreadableFileError,
    file_format,
    iter_structures,
    output_format,
    read_frames,
    read_structures,
    split_name,
    structure_files,
    write_structures,
)
from .relax import CloseAtomsWarning, RelaxResult, RelaxWarning, relax_batch

#: Structures per chunk (and frames per segment of a multi-frame file) by default.
CHUNK = 256
#: Failures and warnings printed one per line; the rest are counted (all are in the manifest).
MAX_PRINTED = 20
_PART = re.compile(r"^\.(?P<name>.+)\.frames(?P<start>\d+)-(?P<stop>\d+)\.extxyz$")


class ScreenError(ValueError):
    """A usage error found before any work (an input that does not exist, outputs that would collide,
    an output that would replace a file the manifest does not know); one line, naming the path."""


# --------------------------------------------------------------------------------------------------
# inputs and outputs
# --------------------------------------------------------------------------------------------------
@dataclass
class Source:
    """One input file and where its predictions go.

    path: the input. output: the output file (a single-structure format writes one file per frame
    when the input has several, ``<stem>_<frame><suffix>``). fmt: the output format (a key of
    :data:`~e3relax_fast.io.FORMATS`). multi_frame: read frame by frame and split into segments
    (extxyz/xyz, trajectories, databases).
    """

    path: Path
    output: Path
    fmt: str
    multi_frame: bool

    @property
    def label(self) -> str:
        """The input as the manifest names it."""
        return str(self.path)

    def frame_output(self, frame: int, several: bool) -> Path:
        """The file of frame ``frame``: the output itself, or one file per frame for a single-structure
        format when the input holds ``several``."""
        if self.fmt not in SINGLE_STRUCTURE_FORMATS or not several:
            return self.output
        stem, suffix = split_name(self.output)
        return self.output.with_name(f"{stem}_{frame}{suffix}")

    def part(self, start: int, stop: int) -> Path:
        """The hidden part file holding frames ``start`` to ``stop - 1`` of a multi-frame output."""
        return self.output.with_name(f".{self.output.name}.frames{start}-{stop}.extxyz")

    def parts(self) -> list[tuple[int, int, Path]]:
        """The part files present, as ``(start, stop, path)`` sorted by ``start``."""
        found = []
        for path in self.output.parent.glob(f".{glob.escape(self.output.name)}.frames*-*.extxyz"):
            match = _PART.match(path.name)
            if match and match["name"] == self.output.name:
                found.append((int(match["start"]), int(match["stop"]), path))
        return sorted(found)


def _is_output_name(path: Path) -> bool:
    """A file a previous run wrote (``*_relaxed.*``, ``*_relaxed_<k>.*``): not an input when a folder
    or a glob pattern is expanded, so that re-running on a folder that holds its outputs does not
    relax them (a file named explicitly is always an input)."""
    return re.search(r"_relaxed(_\d+)?$", split_name(path)[0]) is not None


def collect_inputs(arguments: Sequence[str | Path]) -> list[tuple[Path, Path | None]]:
    """The input files named by ``arguments`` (files, folders, glob patterns), each once, in order:
    ``(file, folder it was found in or None)``.

    Raises:
        ScreenError: an argument matches nothing, or a folder holds no structure file.
    """
    found: dict[Path, Path | None] = {}
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            files = [f for f in structure_files(path) if not _is_output_name(f)]
            if not files:
                raise ScreenError(f"{path}: no structure files in this folder (looked for CIF, POSCAR/CONTCAR/*.vasp, "
                                  "extxyz/xyz, ASE .traj and .db files, also compressed)")
            for f in files:
                found.setdefault(f, path)
        elif path.exists():
            found.setdefault(path, None)
        elif glob.has_magic(str(argument)):
            matches = sorted(Path(m) for m in glob.glob(str(argument), recursive=True)
                             if Path(m).is_file() and not _is_output_name(Path(m)))
            if not matches:
                raise ScreenError(f"{argument}: no file matches this pattern")
            for f in matches:
                found.setdefault(f, None)
        else:
            raise ScreenError(f"{path}: no such file or folder")
    return list(found.items())


def plan_sources(inputs: Sequence[tuple[Path, Path | None]], outdir: Path | None = None,
                 fmt: str | None = None) -> list[Source]:
    """Each input's :class:`Source`: the output format (``fmt``, else the input's own, see
    :func:`~e3relax_fast.io.output_format`) and the output path (``<stem>_relaxed<suffix>``, the input's
    suffix kept when the format is kept; in ``outdir`` when given, under the input's path relative to
    the folder it was found in).

    Raises:
        ScreenError: ``outdir`` is an existing file, or two inputs would write the same output.
    """
    if outdir is not None and outdir.exists() and not outdir.is_dir():
        raise ScreenError(f"-o {outdir}: an existing file; -o names the folder the outputs go to")
    if fmt is not None and fmt not in FORMATS:
        raise ScreenError(f"unknown output format {fmt!r} (one of {', '.join(FORMATS)})")
    sources, seen = [], {}
    for path, root in inputs:
        ase_format = file_format(path)
        own = output_format(ase_format)
        out_fmt = fmt or own
        stem, suffix = split_name(path)
        if out_fmt != own or (out_fmt == "extxyz" and suffix.lower() not in (".extxyz", ".xyz")):
            suffix = FORMATS[out_fmt]
        folder = path.parent if outdir is None else outdir / (path.parent.relative_to(root) if root else "")
        output = folder / f"{stem}_relaxed{suffix}"
        if output in seen:
            raise ScreenError(f"{seen[output]} and {path} would both write {output}; use -o with separate folders "
                              "or rename one")
        seen[output] = path
        sources.append(Source(path, output, out_fmt, ase_format in MULTI_FRAME_FORMATS))
    return sources


# --------------------------------------------------------------------------------------------------
# the manifest
# --------------------------------------------------------------------------------------------------
class Manifest:
    """The JSON-lines record of a run: ``path`` (merged) and one part per rank (``<path>.part<rank>``),
    appended to during the run and merged into ``path`` at its end."""

    def __init__(self, path: Path, rank: int = 0) -> None:
        self.path = Path(path)
        self.part = self.path.with_name(f"{self.path.name}.part{rank}")

    def _files(self) -> list[Path]:
        pattern = re.compile(re.escape(self.path.name) + r"\.part\d+$")
        parts = sorted(p for p in self.path.parent.glob(f"{glob.escape(self.path.name)}.part*")
                       if pattern.match(p.name))
        return ([self.path] if self.path.exists() else []) + parts

    def read(self) -> list[dict]:
        """Every line of the manifest and its parts, in order (a line torn by a crash is left out)."""
        lines = []
        for path in self._files():
            for text in path.read_text().splitlines():
                try:
                    line = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if isinstance(line, dict) and "input" in line:
                    lines.append(line)
        return lines

    def clear(self) -> None:
        """Forget earlier runs: remove the merged manifest and every part."""
        for path in self._files():
            path.unlink(missing_ok=True)

    def append(self, lines: list[dict]) -> None:
        """Append to this rank's part, on disk before returning."""
        if not lines:
            return
        self.part.parent.mkdir(parents=True, exist_ok=True)
        with self.part.open("a") as fh:
            fh.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
            fh.flush()
            os.fsync(fh.fileno())

    def merge(self, order: Sequence[str]) -> int:
        """Rewrite ``path`` with one line per structure (the last recorded wins; a file-level failure
        line is dropped once the file has structure lines after it), inputs in ``order`` first, then
        any others as found; remove the parts. Returns the number of lines."""
        latest: dict[tuple[str, int | None], dict] = {}
        for line in self.read():
            key = (line["input"], line.get("frame"))
            if key[1] is not None:
                latest.pop((key[0], None), None)
            latest.pop(key, None)
            latest[key] = line
        rank = {name: k for k, name in enumerate(order)}
        lines = sorted(latest.values(), key=lambda line: (rank.get(line["input"], len(rank)),
                                                           line.get("frame") is not None, line.get("frame") or 0))
        partial = self.path.with_name(f".{self.path.name}.partial")
        partial.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
        os.replace(partial, self.path)
        for path in self._files()[1:]:
            path.unlink(missing_ok=True)
        return len(lines)


# --------------------------------------------------------------------------------------------------
# units of work
# --------------------------------------------------------------------------------------------------
@dataclass
class _Item:
    """One structure to relax (``atoms``), or one that could not be read (``error``)."""

    frame: int | None
    atoms: object | None = None
    error: str | None = None


@dataclass
class _Unit:
    """A whole file (``segment`` None) or frames ``segment[0]`` to ``segment[1] - 1`` of a multi-frame one."""

    source: Source
    items: list[_Item]
    segment: tuple[int, int] | None = None
    several: bool = False  # the file holds several structures (single-structure formats: one file each)


@dataclass
class ScreenSummary:
    """What a rank (or, after :func:`screen`, the whole run) did."""

    relaxed: int = 0
    failed: int = 0
    skipped: int = 0  # recorded relaxed by an earlier run
    files: int = 0
    written: int = 0
    warned: int = 0
    seconds: float = 0.0
    stopped: bool = False  # on_error="raise" stopped the run at a failure
    messages: list[str] = field(default_factory=list)  # problems found when merging

    def add(self, other: ScreenSummary) -> None:
        for name in ("relaxed", "failed", "skipped", "files", "written", "warned"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.seconds = max(self.seconds, other.seconds)
        self.stopped = self.stopped or other.stopped
        self.messages += other.messages


def _done(records: dict, label: str, frames: range) -> bool:
    return all(records.get((label, k), {}).get("status") == "relaxed" for k in frames)


def _file_done(records: dict, source: Source) -> int:
    """The structures of a whole-file source, if an earlier run relaxed every one of them, else 0."""
    frames = sorted(k for (label, k) in records if label == source.label and k is not None)
    return len(frames) if frames == list(range(len(frames))) and _done(records, source.label, frames) else 0


def _units(sources: list[Source], records: dict, chunk: int, rank: int, world: int, summary: ScreenSummary,
           frame_counts: dict[str, int]) -> Iterator[_Unit]:
    """This rank's units of work not already done, in input order. Whole files are dealt in turn
    (file ``f`` to rank ``f % world``); every rank reads every multi-frame file and takes the segments
    dealt to it (segment ``s`` of file ``f`` to rank ``(f + s) % world``), noting its frame count in
    ``frame_counts``."""
    for f, source in enumerate(sources):
        if not source.multi_frame:
            if f % world != rank:
                continue
            done = _file_done(records, source)
            if done:
                summary.skipped += done
                continue
            try:
                structures = read_structures(source.path)
            except UnreadableFileError as err:
                yield _Unit(source, [_Item(None, error=str(err))])
                continue
            summary.files += 1
            yield _Unit(source, [_Item(k, a) for k, a in enumerate(structures)], several=len(structures) > 1)
            continue
        start, items, s = 0, [], 0
        stream = iter_structures(source.path)
        while True:
            try:
                atoms = next(stream)
            except StopIteration:
                atoms = None
            except UnreadableFileError as err:
                atoms = None
                if (f + s) % world == rank:  # the segment the unreadable frame falls in
                    items.append(_Item(err.frame, error=str(err)))
            stop = start + len(items) if atoms is None else None
            if atoms is not None:
                items.append(_Item(start + len(items), atoms))
                if len(items) < chunk:
                    continue
                stop = start + len(items)
            if (f + s) % world == rank and items:
                if _done(records, source.label, range(start, stop)):
                    summary.skipped += len(items)
                else:
                    yield _Unit(source, items, (start, stop), several=True)
            if atoms is None:
                frame_counts[source.label] = start + sum(it.error is None for it in items)
                if rank == 0 and frame_counts[source.label]:  # every rank reads it: rank 0 counts it
                    summary.files += 1
                break
            start, items, s = stop, [], s + 1


def _chunks(units: Iterator[_Unit], chunk: int) -> Iterator[list[_Unit]]:
    """Whole units grouped until they hold ``chunk`` structures."""
    group, size = [], 0
    for unit in units:
        group.append(unit)
        size += len(unit.items)
        if size >= chunk:
            yield group
            group, size = [], 0
    if group:
        yield group


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------
def _relax_chunk(units: list[_Unit], model: nn.Module, options: dict) -> tuple[dict, dict, dict]:
    """Relax every readable structure of ``units``: ``(results, errors, notes)``, keyed by
    ``(unit index, item index)``: the relaxed ``Atoms``, the failure reasons, the close-atoms notes;
    uncertainties go into the results' ``info``."""
    keys = [(u, i) for u, unit in enumerate(units) for i, item in enumerate(unit.items) if item.error is None]
    structures = [units[u].items[i].atoms for u, i in keys]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = relax_batch(structures, model, on_error="skip", **options) if structures else RelaxResult()
    notes = {}
    for w in caught:
        if isinstance(w.message, CloseAtomsWarning):
            notes = {keys[index]: what for index, what in w.message.structures.items()}
        elif not issubclass(w.category, RelaxWarning):  # failures are reported per structure below
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    errors = {keys[index]: reason for index, reason in out.errors.items()}
    errors.update({(u, i): item.error for u, unit in enumerate(units) for i, item in enumerate(unit.items)
                   if item.error is not None})
    results = {}
    for index, atoms in enumerate(out):
        if atoms is None:
            continue
        if out.uncertainty is not None and out.uncertainty[index] is not None:
            atoms.info["uncertainty"] = out.uncertainty[index]
        results[keys[index]] = atoms
    return results, errors, notes


def _placeholder(atoms, reason: str):
    """The input frame standing for a failed one in a multi-frame output (alignment kept)."""
    atoms = atoms.copy()
    atoms.info.update(relax_status="failed", relax_error=reason)
    return atoms


def _write_unit(u: int, unit: _Unit, results: dict, errors: dict, on_error: str) -> tuple[int, dict[int, Path]]:
    """Write one unit's outputs; ``(files written, {item index: output it is in})``."""
    source, written, where = unit.source, 0, {}
    # One file per structure (a single-structure format, or a file of one structure): a failure gets none.
    if source.fmt in SINGLE_STRUCTURE_FORMATS or not unit.several:
        for i, item in enumerate(unit.items):
            atoms = results.get((u, i))
            if atoms is None and on_error == "return_input" and item.atoms is not None:
                atoms = item.atoms
            if atoms is not None:
                path = source.frame_output(item.frame, unit.several)
                write_structures(path, [atoms], source.fmt)
                written += 1
                where[i] = path
        return written, where
    frames = []
    for i, item in enumerate(unit.items):
        if item.atoms is None:
            continue  # an unreadable frame: nothing to stand for it (the file ends there)
        atoms = results.get((u, i))
        if atoms is None:
            atoms = _placeholder(item.atoms, errors[(u, i)])
        else:
            atoms.info["relax_status"] = "relaxed"
        frames.append(atoms)
        where[i] = source.output
    if not frames:
        return 0, where
    if unit.segment is None:
        write_structures(source.output, frames, source.fmt)
        return 1, where
    write_structures(source.part(*unit.segment), frames, "extxyz")
    return 0, where  # counted when the output is assembled


def _assemble(source: Source, frames: int, records: dict) -> tuple[bool, str | None]:
    """Put a multi-frame output together from its parts (and, between them, the frames an earlier run
    already wrote into the output); remove the parts. ``(written, problem)``."""
    parts = source.parts()
    if not parts:
        return False, None
    pieces, pos = [], 0
    for start, stop, path in parts:
        if start < pos:
            return False, (f"{source.output}: not assembled, its parts overlap (was --chunk changed between runs?); "
                           "run again with --overwrite")
        if start > pos:
            pieces.append((source.output, pos, start))
        pieces.append((path, None, None))
        pos = stop
    if pos < frames:
        pieces.append((source.output, pos, frames))
    for path, start, stop in pieces:
        if start is not None and not (_done(records, source.label, range(start, stop)) and path.exists()):
            return False, (f"{source.output}: not assembled, frames {start} to {stop - 1} are missing (parts kept; "
                           "run again to finish, or with --overwrite)")

    def frames_in_order():
        for path, start, stop in pieces:
            yield from (iter_structures(path) if start is None else read_frames(path, start, stop))

    write_structures(source.output, frames_in_order(), source.fmt)
    for _, _, path in parts:
        path.unlink()
    return True, None


def _world() -> tuple[int, int, bool]:
    """``(rank, world size, joined)`` under torchrun (``joined``: this call joined its process group, so
    the caller leaves it at the end), else ``(0, 1, False)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, False
    import datetime

    import torch.distributed as dist

    joined = not dist.is_initialized()
    if joined:
        # gloo whatever the device: the ranks only exchange small Python objects, and a long timeout
        # because the final barrier waits for the slowest rank's share of the screening.
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return dist.get_rank(), dist.get_world_size(), joined


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _gather(summary: ScreenSummary, counts: dict[str, int], world: int) -> tuple[list, list]:
    if world == 1:
        return [summary], [counts]
    import torch.distributed as dist

    everything = [None] * world
    dist.all_gather_object(everything, (summary, counts))
    return [s for s, _ in everything], [c for _, c in everything]


def _start(book: Manifest, sources: list[Source], overwrite: bool, rank: int, world: int) -> dict:
    """The records of earlier runs, every rank alike (``{}`` with ``overwrite``, which removes them).

    Raises:
        ScreenError: an output exists that the manifest does not record.
    """
    if rank == 0:
        if overwrite:
            book.clear()
            for source in sources:
                for _, _, path in source.parts():
                    path.unlink()
        elif book.read():
            book.merge([s.label for s in sources])  # fold in a killed run's parts: this run's are all newer
    _barrier(world)  # every rank starts from the same records
    if overwrite:
        return {}
    records = {(line["input"], line.get("frame")): line for line in book.read()}
    known = {label for label, _ in records}
    strangers = [s.output for s in sources if s.output.exists() and s.label not in known]
    if strangers:
        raise ScreenError(f"{strangers[0]} exists and {book.path} does not record it"
                          + (f" (nor {len(strangers) - 1} other output(s))" if len(strangers) > 1 else "")
                          + ": pass --overwrite to replace it, or -o another folder")
    return records


def _record(units: list[_Unit], relaxed: tuple[dict, dict, dict], seconds: float, on_error: str,
            summary: ScreenSummary, say) -> list[dict]:
    """Write the chunk's outputs; its manifest lines (counted in ``summary``, failures and warnings
    ``say``-ed)."""
    results, errors, notes = relaxed
    lines = []
    for u, unit in enumerate(units):
        written, where = _write_unit(u, unit, results, errors, on_error)
        summary.written += written
        for i, item in enumerate(unit.items):
            line = {"input": unit.source.label, "frame": item.frame, "output": str(where[i]) if i in where else None,
                    "status": "relaxed" if (u, i) in results else "failed", "reason": errors.get((u, i)),
                    "seconds": round(seconds, 6)}
            atoms = results.get((u, i))
            if atoms is not None and "uncertainty" in atoms.info:
                line["uncertainty"] = float(atoms.info["uncertainty"])
            if (u, i) in notes:
                line["warning"] = f"implausibly close atoms: {notes[(u, i)]}"
                summary.warned += 1
                say(f"warning: {_where(unit.source, item.frame)}: {line['warning']}")
            if line["status"] == "failed":
                summary.failed += 1
                say(f"error: {_where(unit.source, item.frame)}: {_strip(line['reason'], unit.source, item.frame)}")
            else:
                summary.relaxed += 1
            lines.append(line)
    return lines


def _finish(book: Manifest, sources: list[Source], summary: ScreenSummary, counts: dict, rank: int,
            world: int) -> ScreenSummary:
    """After every rank's share: the run's summary (on every rank); rank 0 assembles the multi-frame
    outputs and merges the manifest."""
    _barrier(world)
    summaries, all_counts = _gather(summary, counts, world)
    total = ScreenSummary()
    for s in summaries:
        total.add(s)
    if rank == 0:
        frame_counts = {k: v for c in all_counts for k, v in c.items()}
        records = {(line["input"], line.get("frame")): line for line in book.read()}
        for source in sources:
            if source.multi_frame and source.fmt not in SINGLE_STRUCTURE_FORMATS and source.label in frame_counts:
                written, problem = _assemble(source, frame_counts[source.label], records)
                total.written += written
                if problem:
                    total.messages.append(problem)
        book.merge([s.label for s in sources])
    _barrier(world)  # the merged manifest and outputs are in place before any rank returns
    return total


def screen(sources: list[Source], model: nn.Module, manifest: Path, on_error: str = "raise", chunk: int = CHUNK,
           overwrite: bool = False, progress: bool = True, **options) -> ScreenSummary:
    """Relax every structure of ``sources``, writing their outputs and the manifest (see the module
    docstring); under torchrun, this rank's share, and the whole run's summary on every rank.

    Args:
        sources: from :func:`plan_sources`.
        model: passed to :func:`~e3relax_fast.relax.relax_batch` with ``options``.
        manifest: the manifest's path.
        on_error: ``"raise"``: stop at the first chunk with a failure; ``"skip"``: go on;
            ``"return_input"``: go on, and write a failed single-structure file's input unchanged.
        chunk: structures per chunk and frames per segment of a multi-frame file.
        overwrite: ignore (and remove) the records of earlier runs and redo everything.
        progress: a progress bar (rank 0). Failures and warnings are printed one line each (at most
            :data:`MAX_PRINTED` per rank) whatever ``progress``.

    Raises:
        ScreenError: an output exists that the manifest does not record (``overwrite`` replaces it).
    """
    from tqdm import tqdm

    rank, world, joined = _world()
    book = Manifest(manifest, rank)
    records = _start(book, sources, overwrite, rank, world)
    summary, counts, printed = ScreenSummary(), {}, 0
    start = time.perf_counter()
    # A total for whole files (one structure each, as a rule); multi-frame files are counted as read.
    total = None if any(s.multi_frame for s in sources) else sum(
        1 for f, s in enumerate(sources) if f % world == rank and not _file_done(records, s))
    bar = tqdm(total=total, unit=" structures", disable=not progress or rank != 0, dynamic_ncols=True,
               file=sys.stderr)

    def say(message: str) -> None:
        nonlocal printed
        printed += 1
        if printed <= MAX_PRINTED:
            bar.write(message, file=sys.stderr)

    for units in _chunks(_units(sources, records, chunk, rank, world, summary, counts), chunk):
        # Recorded before any output is written: a kill from here on leaves outputs the manifest knows of.
        book.append([{"input": unit.source.label, "frame": item.frame, "status": "started"}
                     for unit in units for item in unit.items])
        t0 = time.perf_counter()
        relaxed = _relax_chunk(units, model, options)
        n = sum(len(unit.items) for unit in units)
        book.append(_record(units, relaxed, (time.perf_counter() - t0) / n, on_error, summary, say))
        bar.update(n)
        bar.set_postfix(failed=summary.failed, refresh=False)
        if summary.failed and on_error == "raise":
            summary.stopped = True
            break
    bar.close()
    if printed > MAX_PRINTED:
        print(f"... {printed - MAX_PRINTED} more failure(s)/warning(s), all in {manifest}", file=sys.stderr)
    summary.seconds = time.perf_counter() - start
    total_summary = _finish(book, sources, summary, counts, rank, world)
    if joined:
        import torch.distributed as dist

        dist.destroy_process_group()
    return total_summary


def _where(source: Source, frame: int | None) -> str:
    return str(source.path) if frame is None else f"{source.path} (frame {frame})"


def _strip(reason: str, source: Source, frame: int | None) -> str:
    """A read error's reason without the file name (and frame) that :func:`_where` already gives."""
    return reason.removeprefix(f"cannot read {source.path}: ").removeprefix(f"frame {frame}: ")
