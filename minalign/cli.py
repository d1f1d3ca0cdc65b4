"""What the command-line stages (sample.py, score.py) share: one-line errors, and the partial files that let a
killed run resume.

Partial files. A stage appends its finished work to <out>.partial (<out>.partial.rank<r> under torchrun), whole
JSON lines fsynced after every append, below a header line {"format": <the stage's format>, "settings": {...}}.
`--resume` checks that header (the same stage, the same settings), cuts off a line torn by the kill, and does
only the work no file holds. When everything is done, rank 0 merges the partial files into <out> with one
atomic write and removes them.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import inspect
import json
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError

from minalign import distributed
from minalign.data import DataError, jsonl_line, read_jsonl, write_jsonl


class CliError(Exception):
    """A problem the user can fix; `main` prints it as one line and the stage exits with status 2."""


class BadRows:
    """The on_error of read_jsonl, and of a stage's own row checks: stop at the first bad row (a CliError naming
    path:line), or with --skip-invalid keep going and collect them in .skipped. switch: how this CLI says
    "skip invalid rows", for the message."""

    def __init__(self, skip_invalid: bool, switch: str = "--skip-invalid"):
        self.skip_invalid, self.switch, self.skipped = skip_invalid, switch, []

    def __call__(self, err: DataError) -> None:
        if not self.skip_invalid:
            raise CliError(f"{err} ({self.switch} skips bad rows)")
        self.skipped.append(err)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after a flag's help, once: not where the help says its default already, nor for
    a flag without one (None, an off switch, an empty list); an epilog as written (the settings table)."""

    def _get_help_string(self, action):
        d = action.default
        if "default" in (action.help or "") or d is None or d is False or d == [] or d == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)

    def _fill_text(self, text, width, indent):
        return text


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is a CliError: one line (no usage block above it) and status 2 from `main`, as
    every other mistake is; and the loop can check its stages' flags with the stages' own parsers."""

    def error(self, message):
        raise CliError(f"{message} (--help lists the flags)")


def parser(doc: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A stage's argument parser, described by its docstring's first line ("sample.py: what it does")."""
    return _Parser(description=doc.split("\n")[0].split(": ", 1)[1], epilog=epilog, formatter_class=_HelpFormatter)


_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")


def field_help(section) -> dict[str, str]:
    """{field: its meaning} of a settings dataclass: the comment on the field's line in its source, the one place
    a setting is explained (so --help cannot drift from the code)."""
    return {m[1]: m[2].strip() for m in map(_FIELD_COMMENT.match, inspect.getsource(type(section)).splitlines())
            if m}


def settings_help(cfg) -> str:
    """Every `section.key` of a settings dataclass with its default and meaning, one line each, for --help."""
    lines = []
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        meaning = field_help(section)
        for g in dataclasses.fields(section):
            default = getattr(section, g.name)
            flag = f"  --{f.name}.{g.name} {_toml_text(default)}"
            lines.append(f"{flag:<48} {meaning.get(g.name, '')}".rstrip())
    return "\n".join(lines)


def _toml_text(value) -> str:
    """A default as it is written in the TOML file."""
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str) else str(value)


def add_common_flags(p: argparse.ArgumentParser, rows: str) -> None:
    """The flags every stage has: --dtype, --device, --resume, --skip-invalid (rows: what its input rows are)."""
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="weights' dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available; under torchrun each rank takes cuda:LOCAL_RANK")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>.partial if it exists (a finished --out: nothing to do)")
    p.add_argument("--overwrite", action="store_true", help="redo a finished --out (it is replaced when done)")
    p.add_argument("--skip-invalid", action="store_true",
                   help=f"report bad {rows} rows on stderr and skip them instead of stopping")


def check_flags(p: argparse.ArgumentParser, args: argparse.Namespace, in_range: dict[str, bool]) -> None:
    """p.error (a CliError) for --device cuda without CUDA and for the first
    flag of in_range ({"--top-p": 0 < args.top_p <= 1, ...}) whose value is out of range."""
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    for flag, ok in in_range.items():
        if not ok:
            p.error(f"{flag} {getattr(args, flag[2:].replace('-', '_'))} is out of range")


def main(prog: str, argv: list[str] | None, parse_args: Callable, run: Callable, *, kept: str,
         interrupted: str | Callable[[argparse.Namespace], str] | None = None) -> int:
    """A stage's main: parse argv, join torchrun's process group (if any), run(args, rank, world, device).

    Returns the exit status: run's (0), 2 with one line on stderr for a CliError or DataError, 130 on Ctrl-C.
    kept: what an interrupted run keeps in its partial file ("finished prompts"), for the message;
    interrupted: the whole message after "interrupted; " instead (or a function of the args giving it), for a
    stage that keeps no partial file.
    """
    try:
        args = parse_args(argv)  # --help prints and exits (0) in here
    except CliError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    rank, world, device = distributed.init(args.device)
    where = f"[rank {rank}] " if world > 1 else ""
    try:
        return run(args, rank, world, device)
    except (CliError, DataError) as e:
        print(f"{prog}: {where}error: {e}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as e:  # a full disk, a read-only dir (safetensors' writer raises its own
        # error for them; files it reads are checked before any work): what was finished is kept
        print(f"{prog}: {where}error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if callable(interrupted):
            interrupted = interrupted(args)
        print(f"{prog}: {where}interrupted; " + (interrupted or f"{kept} are kept in the partial file beside "
              f"{args.out}, rerun with --resume to continue"), file=sys.stderr)
        return 130


def _typed(section: str, name: str, default, value):
    """value converted to the type of the field's default; CliError if it does not fit."""
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is list and isinstance(value, (list, tuple)):
        want = type(default[0]) if default else None  # a list's items take the type of the default's
        if want is float and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return [float(v) for v in value]
        if want is not None and not all(isinstance(v, want) and not isinstance(v, bool) for v in value):
            raise CliError(f"{section}.{name}: expected a list of {want.__name__}s, got {value!r}")
        return list(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CliError(f"{section}.{name}: expected a {kind.__name__}, got {value!r}")
    return value


def read_settings(cfg, path: str | None, overrides: list[tuple[str, str]] = ()):
    """cfg (a dataclass of section dataclasses, defaults filled in) updated from a TOML file's tables and from
    `section.key value` overrides, each value read as a TOML value (3e-4, true, [0.9, 0.99]) or else taken as a
    string. CliError naming the file, or the unknown section or key, or the value of the wrong type."""
    raw: dict = {}
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise CliError(f"--config {path}: {e}") from None
    for key, text in overrides:
        section, _, name = key.partition(".")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        raw.setdefault(section, {})[name] = value
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for section, values in raw.items():
        if section not in sections or not isinstance(values, dict):
            raise CliError(f"unknown config section {section!r}; known: {', '.join(sections)}")
        obj = sections[section]
        known = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        for name, value in values.items():
            if name not in known:
                raise CliError(f"unknown config key {section}.{name}; {section} has {', '.join(known)}")
            setattr(obj, name, _typed(section, name, known[name], value))
    return cfg


def require_checkpoint_dir(path, name: str) -> Path:
    """path as a Path; CliError naming the flag or key `name` if it is not a directory (missing, or a file)."""
    path = Path(path)
    if not path.is_dir():
        what = "not a directory" if path.exists() else "no such directory"
        raise CliError(f"{name} {path}: {what} (expected an HF checkpoint dir: config.json, weights and tokenizer "
                       f"files)")
    return path


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


def output_done(args: argparse.Namespace, prog: str, **inputs: Path) -> bool:
    """Check --out before any work: not one of the inputs, not a directory, its directory there. True when a
    finished --out is to be kept (--resume: said on stderr); a finished one without --resume or --overwrite is
    refused, so nothing finished is lost by a rerun."""
    out = Path(args.out)
    for flag, path in inputs.items():
        if path.exists() and out.exists() and os.path.samefile(path, out) or out.resolve() == path.resolve():
            raise CliError(f"--out {out} is the --{flag} file: it would be overwritten; choose another --out")
    if out.is_dir():
        raise CliError(f"--out {out} is a directory; give a file path")
    if not out.parent.is_dir():
        raise CliError(f"--out {out}: directory {out.parent} does not exist")
    if args.overwrite:  # from the start: an unfinished earlier run's partial files go too
        on_main(lambda: [p.unlink() for p in existing_partials(out)])
    elif out.exists():
        if args.resume:
            if distributed.is_main():
                print(f"{prog}: {out} is complete already; nothing to do (its settings are not checked again: "
                      f"--overwrite redoes it)", file=sys.stderr)
            return True
        raise CliError(f"--out {out} exists (a finished run); --overwrite redoes it, or choose another --out")
    return False


def on_main(fn: Callable[[], None]) -> None:
    """fn() on rank 0 alone, the other ranks waiting; an error there is raised on every rank, so none is left
    waiting for a rank that has left."""
    error = None
    if distributed.is_main():
        try:
            fn()
        except (CliError, ValueError) as e:  # DataError is a ValueError
            error = e
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        message = [None if error is None else str(error)]
        torch.distributed.broadcast_object_list(message, src=0)
        if message[0] is not None and error is None:
            raise CliError(message[0])
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
                raise CliError(f"{name} {path} is in use by another run (pid {pid}, holding {lock}): one run owns "
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


def partial_entries(paths: list[Path], fmt: str, settings: dict) -> Iterator[tuple[Path, int, dict]]:
    """(file, line number, entry) of every entry below the header of the partial files that exist among paths,
    after checking each header: this stage's format and these settings. The caller validates the entries."""
    for path in paths:
        if not path.is_file():
            continue
        entries = read_jsonl(path)
        _, header = next(entries, (0, None))
        if header is None:  # killed while writing the header: nothing was finished
            continue
        if header.get("format") != fmt:
            raise CliError(f"{path}:1: not a partial file of this stage (no {fmt!r} header); delete it")
        then = header.get("settings", {})
        diffs = [f"{k} {then.get(k)!r} then, {settings.get(k)!r} now" for k in sorted({*then, *settings})
                 if then.get(k) != settings.get(k)]
        if diffs:
            raise CliError(f"{path} was written with other settings ({'; '.join(diffs)}): rerun with the same "
                           f"settings, or delete it to start over")
        for number, entry in entries:
            yield path, number, entry


def open_partials(out: Path, rank: int, world: int, *, resume: bool, fmt: str,
                  settings: dict) -> tuple[Path, list[Path], list[tuple[Path, int, dict]]]:
    """Get every rank's partial file ready; return (this rank's file, all ranks' files, the entries found).

    Every rank checks what an earlier run left before any rank writes; each rank cuts the torn line off its own
    file; all read all files (work may be dealt to the ranks anew on a resume, so what one rank finished may now
    be another's); only then does each rank write its header, if its file has none.
    """
    partial = partial_path(out, rank, world)
    ours = [partial_path(out, r, world) for r in range(world)]
    found = existing_partials(out)
    if found and not resume:
        raise CliError(f"{', '.join(map(str, found))}: an unfinished earlier run; pass --resume to continue it, "
                       f"or delete the partial file(s) to start over")
    if set(found) - set(ours):
        raise CliError(f"{', '.join(map(str, sorted(set(found) - set(ours))))}: partial file(s) of a run with "
                       f"another number of processes than {world}; resume with that many, or delete them")
    if partial.is_file():
        cut_torn_line(partial)
    distributed.barrier()
    entries = list(partial_entries(ours, fmt, settings))
    distributed.barrier()
    if not (partial.is_file() and partial.stat().st_size):
        with open(partial, "wb") as f:
            append_lines(f, [jsonl_line({"format": fmt, "settings": settings})])
    return partial, ours, entries


def write_output(out: Path, rows: list[dict], partials: list[Path]) -> list[dict]:
    """Write the merged rows to out (atomically: complete or not at all), then remove the partial files."""
    write_jsonl(out, rows)
    for path in partials:
        path.unlink()
    return rows
