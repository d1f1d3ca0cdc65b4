"""Files in and out. Every artifact minalign writes goes through atomic_write: a reader (or a resumed run)
sees the old file or the new one, never half of one.

JSONL is the format between stages (prompts -> samples -> scores -> training rows): one JSON object a line,
UTF-8. Errors in input files name `path:line`, so a bad row in a 100k-line file can be found with `sed -n`.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (what a resume checks its input against)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write data to path via a temp file in the same directory, fsync, then os.replace (atomic on POSIX)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


class DataError(ValueError):
    """A bad line of an input file; str() is 'path:line: what is wrong'."""

    def __init__(self, path: str | os.PathLike, line: int, message: str):
        super().__init__(f"{path}:{line}: {message}")
        self.path, self.line, self.message = str(path), line, message


def read_jsonl(path: str | os.PathLike,
               on_error: Callable[[DataError], None] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line number from 1, row) for each JSON object line of path; blank lines are skipped.

    A line that is not valid UTF-8 JSON, or not an object, raises DataError naming path:line; with on_error,
    that function gets the error instead and reading goes on with the next line (for --skip-invalid).
    """
    # Binary mode splits on b"\n" only; text mode would also split on a lone "\r", which JSON allows as
    # whitespace. (A raw newline cannot occur inside a JSON string, so b"\n" always ends a row.)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                problem = None if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"
            except UnicodeDecodeError as e:
                problem = f"not valid UTF-8 ({e.reason} at byte {e.start})"
            except json.JSONDecodeError as e:
                problem = f"malformed JSON ({e.msg} at column {e.colno})"
            if problem is None:
                yield number, row
            elif on_error is None:
                raise DataError(path, number, problem)
            else:
                on_error(DataError(path, number, problem))


def jsonl_line(row: dict) -> str:
    """One JSONL line (with its newline) for row: UTF-8 text as is, and no NaN/Infinity, which JSON lacks."""
    return json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write rows as JSONL, atomically: the file appears complete or not at all."""
    return atomic_write(path, "".join(jsonl_line(row) for row in rows))


def _short(value, limit: int = 80) -> str:
    """repr(value), cut to limit characters: an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def prompt_of(row: dict) -> str | list[dict]:
    """The prompt of a prompts.jsonl row: its "prompt" string or its "messages" list; ValueError if malformed.

    Only the shape is checked here ("role"/"content" strings); which role sequences a template accepts is
    chat.render_prompt's business. An "id", when present, must be a string or an integer.
    """
    if "id" in row and (isinstance(row["id"], bool) or not isinstance(row["id"], (str, int))):
        raise ValueError(f'"id" must be a string or an integer, got {_short(row["id"])}')
    has_prompt, has_messages = "prompt" in row, "messages" in row
    if has_prompt == has_messages:
        raise ValueError('a row needs exactly one of "prompt" (a string) or "messages" (a list of '
                         f'{{"role", "content"}} objects); got keys {sorted(row)}')
    if has_prompt:
        if not isinstance(row["prompt"], str):
            raise ValueError(f'"prompt" must be a string, got {type(row["prompt"]).__name__}')
        return row["prompt"]
    return messages_of(row["messages"], "messages")


def as_messages(prompt: str | list[dict], system: str | None = None) -> list[dict]:
    """A prompt as messages: a string is one user message; system, when given, goes first unless the prompt has a
    system message of its own (a row's own wins)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def messages_of(messages, key: str) -> list[dict]:
    """messages, the value of field key, checked to be a non-empty list of {"role", "content"} strings."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'"{key}" must be a non-empty list, got {_short(messages)}')
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f'{key}[{i}] must be an object with "role" and "content" strings, got {_short(m)}')
    return messages
