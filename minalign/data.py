"""Files in and out. Every artifact minalign writes goes through atomic_write: a reader (or a resumed run)
sees the old file or the new one, never half of one; and it has the permissions the umask gives.

JSONL is the format between stages (prompts -> samples -> scores -> training rows): one JSON object a line,
UTF-8 (what each row kind holds: rows.py). Errors in input files name `path:line`, so a bad row in a 100k-line file can be found with `sed -n`. Rows
are read as JSON has them, stricter than Python's json (no NaN, no lone surrogate: parse_json_line), so that a
bad value is refused up front, not when a result holding it is written.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from minalign.errors import DataError


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (what a resume checks its input against)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else set and put back."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration):
        mask = os.umask(0o077)  # briefly a strict mask, never a looser one, should another thread create a file
        os.umask(mask)
        return mask


def file_mode() -> int:
    """The permissions open() gives a new file: 0o666 less the umask (mkstemp and safetensors give 0600)."""
    return 0o666 & ~umask()


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write data to path via a temp file in the same directory, fsync, then os.replace (atomic on POSIX).

    The file gets the permissions open() would give it (file_mode), not the 0600 of mkstemp's temp file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


class _NotJson(ValueError):
    """What Python's json module reads but JSON has not (NaN, Infinity, a number past a float's range)."""


def _refuse_constant(name: str):
    """json.loads' parse_constant: NaN, Infinity and -Infinity are refused."""
    raise _NotJson(f"{name} is not JSON, which has no NaN or infinity (Python's json writes them unless told not to)")


def _finite_float(text: str) -> float:
    """json.loads' parse_float: a number that a float can hold (1e999 would be read as infinity)."""
    value = float(text)
    if value in (math.inf, -math.inf):
        raise _NotJson(f"the number {text[:20]} is past a float's range")
    return value


# Deeper rows are refused: json reads and writes nested values by recursion, and a row read near Python's
# recursion limit (1000) could fail only when a result holding it is written, from deeper in the stack.
MAX_DEPTH = 100


def _nested_within(row: dict, limit: int) -> bool:
    """Whether no list or object in row lies more than limit deep (row itself is depth 1); not recursive."""
    stack = [(row, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return False
        items = value.values() if isinstance(value, dict) else value
        stack.extend((v, depth + 1) for v in items if isinstance(v, (dict, list)))
    return True


# A \uD800-\uDFFF escape: half of a UTF-16 pair. Alone it is no character, and writing it as UTF-8 fails later.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json_line(raw: bytes) -> dict:
    """One JSONL row from its bytes; ValueError saying what is wrong (the caller names path:line).

    Stricter than json.loads where it matters later: NaN and Infinity, numbers past a float's range and lone
    surrogates are refused now, not when a result holding them is written; so is nesting too deep to parse.
    """
    try:
        row = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"nested more than {MAX_DEPTH} lists or objects deep") from None
    except _NotJson as e:
        raise ValueError(str(e)) from None
    except ValueError:  # the one other thing json.loads raises: int() refuses a number this long
        raise ValueError("an integer of more than 4300 digits, which Python's json does not read") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    # Fewer brackets than the limit cannot nest deeper than it: the walk is for rows with many.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and not _nested_within(row, MAX_DEPTH):
        raise ValueError(f"nested more than {MAX_DEPTH} lists or objects deep")
    if _SURROGATE_ESCAPE.search(raw):  # a pair is one character, and fine: check by writing the row as UTF-8
        try:
            jsonl_line(row).encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"a lone surrogate \\u{ord(e.object[e.start]):04x} (half of a UTF-16 pair: no "
                             f"character, and UTF-8 cannot hold it)") from None
    return row


def read_jsonl(path: str | os.PathLike,
               on_error: Callable[[DataError], None] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line number from 1, row) for each JSON object line of path; blank lines are skipped.

    A line that parse_json_line refuses (not valid UTF-8 JSON, not an object, NaN, ...) raises DataError naming
    path:line; with on_error, that function gets the error instead and reading goes on with the next line (for
    --skip-invalid).
    """
    # Binary mode splits on b"\n" only; text mode would also split on a lone "\r", which JSON allows as
    # whitespace. (A raw newline cannot occur inside a JSON string, so b"\n" always ends a row.)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = parse_json_line(raw)
            except ValueError as e:
                if on_error is None:
                    raise DataError(path, number, str(e)) from None
                on_error(DataError(path, number, str(e)))
                continue
            yield number, row


def jsonl_line(row: dict) -> str:
    """One JSONL line (with its newline) for row: UTF-8 text as is, and no NaN/Infinity, which JSON lacks."""
    return json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write rows as JSONL, atomically: the file appears complete or not at all."""
    return atomic_write(path, "".join(jsonl_line(row) for row in rows))


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in file path (a config.json, an index); ValueError naming path when it is not valid UTF-8,
    not valid JSON (a 5000-digit number, nesting 100k deep included) or not an object."""
    try:
        obj = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, int() of a huge number, [[[[...
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def short_repr(value, limit: int = 80) -> str:
    """repr(value), cut to limit characters: an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
