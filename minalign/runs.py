"""The one resumable-stage mechanism: the stages (sample, score, train), the loop and the demo's setup own their
output while they run, checks a restart's settings against the first run's, keeps finished work in files a
kill cannot corrupt, and makes its artifact appear whole or not at all.

- **Ownership** (`run_lock`): an flock(2) on <out>.lock: a second run into the same output is refused at once.
- **Settings fingerprint** (`changed_settings`): a restart names each setting it changed; the stage decides which
  may change (what changes no artifact: batch sizes, logging, parallelism).
- **Partial files** (`Partials`): a stage appends its finished work to <out>.partial (<out>.partial.rank<r> under
  torchrun), whole JSON lines fsynced after every append, below a header line {"format": <the stage's format>,
  "settings": {...}}. A resume checks that header (the same stage, the same settings), cuts off a line torn by
  the kill, and does only the work no file holds. When everything is done, rank 0 writes <out> with one atomic
  write (data.atomic_write: a temp file, fsync, rename) and removes the partial files.
- **Rank 0 writes** (`on_main`): what one file needs one writer; an error there is raised on every rank.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch

from minalign import distributed
from minalign.data import jsonl_line, read_jsonl, write_jsonl
from minalign.errors import ConfigError, MinalignError, RunError
from minalign.settings import flag, get_path, stage_flags


def on_main(fn: Callable[[], None]) -> None:
    """fn() on rank 0 alone, the other ranks waiting; an error there is raised on every rank, so none is left
    waiting for a rank that has left. A plain ValueError (from a user's reward or metric function) is raised as a
    MinalignError with its message, so the command line reports it in one line."""
    error = None
    if distributed.is_main():
        try:
            fn()
        except MinalignError as e:
            error = e
        except ValueError as e:
            error = MinalignError(str(e))
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        message = [None if error is None else str(error)]
        torch.distributed.broadcast_object_list(message, src=0)
        if message[0] is not None and error is None:
            raise MinalignError(message[0])
    if error is not None:
        raise error


@contextlib.contextmanager
def run_lock(path: Path, name: str, *, make_parent: bool = False):
    """Own path (an output file or a run dir) while the block runs: a second run into it is refused at once, naming
    path and the pid that holds it. Under torchrun rank 0 holds it for the job, so a second job is refused.

    The lock is flock(2) on <path>.lock, beside path: the OS releases it when the process dies, so a kill -9
    leaves no stale lock (only a lock file, which the next run takes over). On release the file is unlinked
    while still locked, and a taker checks that the file it locked is still the one at that name.
    name: the flag or key that chose path ("--out", "train.out"), for the message. make_parent: create path's
    parent first (a run dir's parent, e.g. runs/); otherwise a missing parent is left for the stage to report.
    """
    lock = path.with_name(path.name + ".lock")
    held: list[int] = []

    def take() -> None:
        if make_parent:
            lock.parent.mkdir(parents=True, exist_ok=True)
        elif not lock.parent.is_dir():
            return
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunError(f"{name} {path} is in use by another run (pid {pid}, holding {lock}): one run owns "
                               f"its outputs; wait for it to end, or choose another {name}") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino  # not unlinked by its last holder meanwhile
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        held.append(fd)

    on_main(take)
    try:
        yield
    finally:
        for fd in held:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            os.close(fd)


def owning_out(stage, cfg, rank: int, world: int, device: torch.device | None) -> Path:
    """stage(cfg, rank, world, device) while this run owns cfg.out (run_lock; device None: the CPU); returns cfg.out."""
    with run_lock(Path(cfg.out), "--out"):
        stage(cfg, rank, world, device or torch.device("cpu"))
    return Path(cfg.out)


def changed_settings(then: dict, now: dict, prefix: str = "") -> list[str]:
    """The keys whose values differ between two settings dicts, sorted, nested tables as "section.key"."""
    out = []
    for k in sorted({*then, *now}):
        a, b = then.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_settings(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def output_done(out: Path, prog: str, *, resume: bool, overwrite: bool, **inputs: Path) -> bool:
    """Check a stage's --out before any work: not one of the inputs, not a directory, its directory there. True
    when a finished out is to be kept (resume: said on stderr); a finished one without resume or overwrite is
    refused, so nothing finished is lost by a rerun."""
    for name, path in inputs.items():
        if path.exists() and out.exists() and os.path.samefile(path, out) or out.resolve() == path.resolve():
            raise RunError(f"--out {out} is the --{name} file: it would be overwritten; choose another --out")
    if out.is_dir():
        raise RunError(f"--out {out} is a directory; give a file path")
    if not out.parent.is_dir():
        raise RunError(f"--out {out}: directory {out.parent} does not exist")
    done = False
    if overwrite:  # from the start: an unfinished earlier run's partial files go too
        on_main(lambda: [p.unlink() for p in existing_partials(out)])
    elif out.exists():
        if not resume:
            raise RunError(f"--out {out} exists (a finished run); --overwrite redoes it, or choose another --out")
        if distributed.is_main():
            print(f"{prog}: {out} is complete already; nothing to do (its settings are not checked again: "
                  f"--overwrite redoes it)", file=sys.stderr)
        done = True
    # Every rank has looked before rank 0 can write out: else a rank that looks late finds it done, skips the
    # stage's collectives, and the others wait for it forever.
    distributed.barrier()
    return done


# ---------------------------------------------------------------------------------------------- partial files

def partial_path(out: Path, rank: int, world: int) -> Path:
    """Where a rank keeps its finished work until the output is complete."""
    return out.with_name(out.name + ".partial" + (f".rank{rank}" if world > 1 else ""))


def existing_partials(out: Path) -> list[Path]:
    """Partial files of any earlier run into out, whatever its number of ranks."""
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f"{out.name}.partial") and p.is_file())


def cut_torn_line(path: Path) -> None:
    """Cut off a last line without its newline: what a kill in the middle of an append leaves."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())


def append_lines(f, lines: list[str]) -> None:
    """Append whole lines and fsync: after a kill, everything but a torn last line is on disk."""
    f.write("".join(lines).encode("utf-8"))
    f.flush()
    os.fsync(f.fileno())


class Partials:
    """Every rank's partial file of one output (module doc): opened by all ranks, appended to by each, merged by
    rank 0.

    Opening checks what an earlier run left before any rank writes: each rank cuts the torn line off its own
    file; all read all files (work may be dealt to the ranks anew on a resume, so what one rank finished may now
    be another's); only then does each rank write its header, if its file has none. `entries` holds what was
    found: (file, line number, entry) for the caller to validate.
    """

    def __init__(self, out: Path, rank: int, world: int, *, resume: bool, fmt: str, settings: dict):
        self.out, self.fmt, self.settings = out, fmt, settings
        self.path = partial_path(out, rank, world)
        self.paths = [partial_path(out, r, world) for r in range(world)]
        found = existing_partials(out)
        if found and not resume:
            raise RunError(f"{', '.join(map(str, found))}: an unfinished earlier run; pass --resume to continue "
                           f"it, or delete the partial file(s) to start over")
        if set(found) - set(self.paths):
            raise RunError(f"{', '.join(map(str, sorted(set(found) - set(self.paths))))}: partial file(s) of a run "
                           f"with another number of processes than {world}; resume with that many, or delete them")
        if self.path.is_file():
            cut_torn_line(self.path)
        distributed.barrier()
        self.entries = list(self.read())
        distributed.barrier()
        if not (self.path.is_file() and self.path.stat().st_size):
            with open(self.path, "wb") as f:
                append_lines(f, [jsonl_line({"format": fmt, "settings": settings})])

    def read(self) -> Iterator[tuple[Path, int, dict]]:
        """(file, line number, entry) of every entry below the header of every rank's file, after checking each
        header: this stage's format and these settings."""
        for path in self.paths:
            if not path.is_file():
                continue
            entries = read_jsonl(path)
            _, header = next(entries, (0, None))
            if header is None:  # killed while writing the header: nothing was finished
                continue
            if header.get("format") != self.fmt:
                raise RunError(f"{path}:1: not a partial file of this stage (no {self.fmt!r} header); delete it")
            then = header.get("settings", {})
            diffs = [f"{k} {then.get(k)!r} then, {self.settings.get(k)!r} now"
                     for k in sorted({*then, *self.settings}) if then.get(k) != self.settings.get(k)]
            if diffs:
                raise RunError(f"{path} was written with other settings ({'; '.join(diffs)}): rerun with the same "
                               f"settings, or delete it to start over")
            for number, entry in entries:
                yield path, number, entry

    @contextlib.contextmanager
    def appender(self):
        """This rank's file, open for append: call the result with whole lines (append_lines)."""
        with open(self.path, "ab") as f:
            yield lambda lines: append_lines(f, lines)

    def commit(self, rows: list[dict]) -> list[dict]:
        """Write the merged rows to out (atomically: complete or not at all), then remove the partial files."""
        write_jsonl(self.out, rows)
        for path in self.paths:
            path.unlink()
        return rows


# ------------------------------------------------------------------------------------------ stage options

@dataclasses.dataclass(kw_only=True)
class StageOptions:
    """What every stage command has besides its own settings (sample.py's and score.py's last flags)."""

    dtype: str | None = flag(None, choices=["bfloat16", "float16", "float32"])  # weights' dtype (default: bfloat16 on cuda, float32 on cpu)
    device: str | None = flag(None, choices=["cpu", "cuda"])  # default: cuda if available; under torchrun each rank takes cuda:LOCAL_RANK
    resume: bool = False  # continue from <out>.partial if it exists (a finished --out: nothing to do)
    overwrite: bool = False  # redo a finished --out (it is replaced when done)
    skip_invalid: bool = False  # report bad input rows on stderr and skip them instead of stopping

    def weights_dtype(self, device: torch.device) -> str:
        """--dtype, or its default on this device."""
        return self.dtype or ("bfloat16" if device.type == "cuda" else "float32")


def check_ranges(in_range: dict[str, bool], cfg) -> None:
    """ConfigError for --device cuda without CUDA and for the first flag of in_range ({"--top-p": 0 < top_p <= 1,
    ...}) whose value is out of range, naming the flag and the value."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA device")
    for name, ok in in_range.items():
        if not ok:
            fl = next(f for f in stage_flags(type(cfg)) if name in f.names)
            raise ConfigError(f"{name} {get_path(cfg, fl.path)} is out of range")
