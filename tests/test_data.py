"""minalign.data: the JSONL reader (path:line errors), the atomic JSONL writer and prompt-row validation."""
import contextlib
import json
import math
import os
import stat

import pytest

from minalign.data import MAX_DEPTH, DataError, atomic_write, jsonl_line, read_jsonl, umask, write_jsonl
from minalign.rows import prompt_of


@contextlib.contextmanager
def umask_set(mask: int):
    """The process's umask is mask inside the block."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    """The permission bits of path."""
    return stat.S_IMODE(os.stat(path).st_mode)


def test_read_jsonl_numbers_lines_and_skips_blank_ones(tmp_path):
    path = tmp_path / "rows.jsonl"
    # CRLF endings, a blank and a whitespace-only line, and a U+2028 inside a string (str.splitlines would
    # split there; a JSONL reader must not).
    path.write_bytes(b'{"a": 1}\r\n\n   \n{"b": "x\xe2\x80\xa8y"}\n{"c": [1, 2]}')
    got = list(read_jsonl(path))
    assert got == [(1, {"a": 1}), (4, {"b": "x\u2028y"}), (5, {"c": [1, 2]})], got


@pytest.mark.parametrize("content, line, phrase", [
    (b'{"a": 1}\n{"a": 2\n', 2, "malformed JSON"),
    (b'{"a": 1}\n\n["not", "an", "object"]\n', 3, "expected a JSON object, got list"),
    (b'{"a": 1}\n{"a": "\xff"}\n', 2, "not valid UTF-8"),
    (b'{"a": 1} {"b": 2}\n', 1, "malformed JSON (Extra data"),
    # What Python's json reads but JSON has not, or what could not be written back as UTF-8 JSON later
    (b'{"a": NaN}\n', 1, "NaN is not JSON"),
    (b'{"a": 1}\n{"a": [1, Infinity]}\n', 2, "Infinity is not JSON"),
    (b'{"a": -Infinity}\n', 1, "-Infinity is not JSON"),
    (b'{"a": 1e999}\n', 1, "the number 1e999 is past a float's range"),
    (b'{"a": -2.5E+400}\n', 1, "past a float's range"),
    (b'{"a": ' + b"9" * 5000 + b'}\n', 1, "an integer of more than 4300 digits"),
    (b'{"a": "x\\ud800y"}\n', 1, "a lone surrogate \\ud800"),
    (b'{"a": ["\\udfff"]}\n', 1, "a lone surrogate \\udfff"),
    (b'{"\\udc00": 1}\n', 1, "a lone surrogate \\udc00"),
    (b'{"a": "\\ude00\\ud83d"}\n', 1, "a lone surrogate"),  # a pair in the wrong order is two halves
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b'}\n', 1, f"nested more than {MAX_DEPTH}"),
    (b'{"a": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b'}\n', 1, f"nested more than {MAX_DEPTH}"),
    (b'{"a": ' + b'{"b": ' * MAX_DEPTH + b"1" + b"}" * MAX_DEPTH + b'}\n', 1, f"nested more than {MAX_DEPTH}"),
])
def test_read_jsonl_errors_name_path_and_line(tmp_path, content, line, phrase):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        list(read_jsonl(path))
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert phrase in message, message
    assert (info.value.path, info.value.line) == (str(path), line)
    assert isinstance(info.value, ValueError)  # callers that know only ValueError still catch it


def test_read_jsonl_reads_what_is_json(tmp_path):
    """The stricter checks refuse nothing JSON has: surrogate pairs, an escaped backslash before "ud800", large
    and tiny floats, MAX_DEPTH levels of nesting, brackets inside strings."""
    path = tmp_path / "ok.jsonl"
    deepest = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)  # the row is level 1
    path.write_text('{"a": "\\ud83d\\ude00", "b": "\\\\ud800"}\n{"x": [1e308, -1.5e-320, 0.1, -0.0, 12]}\n'
                    f'{{"d": {deepest}}}\n{{"s": "{"[" * 500}"}}\n')
    rows = [row for _, row in read_jsonl(path)]
    assert rows[0] == {"a": "\U0001f600", "b": "\\ud800"}
    assert rows[1] == {"x": [1e308, -1.5e-320, 0.1, -0.0, 12]}
    assert rows[2]["d"] == json.loads(deepest) and rows[3] == {"s": "[" * 500}


def test_read_jsonl_on_error_reports_and_goes_on(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"a": 1}\n{oops\n{"a": 3}\n7\n{"a": 5}\n')
    errors = []
    rows = list(read_jsonl(path, on_error=errors.append))
    assert rows == [(1, {"a": 1}), (3, {"a": 3}), (5, {"a": 5})], rows
    assert [e.line for e in errors] == [2, 4], [str(e) for e in errors]


def test_write_jsonl_round_trips_one_line_per_row(tmp_path):
    rows = [{"id": 1, "text": "héllo ✓\nsecond line"}, {"id": "b", "x": [0.1, -2.5e-8], "y": None}]
    path = write_jsonl(tmp_path / "out.jsonl", rows)
    data = path.read_text(encoding="utf-8")
    assert data.count("\n") == 2 and data.endswith("\n"), repr(data)
    assert "héllo ✓" in data  # UTF-8 as is, not \u escapes
    assert [row for _, row in read_jsonl(path)] == rows
    assert data == "".join(jsonl_line(r) for r in rows)


def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"old": True}])
    # NaN is not JSON: the writer refuses it, and the earlier file stays whole with no temp file left over.
    with pytest.raises(ValueError):
        write_jsonl(path, [{"new": 1}, {"bad": math.nan}])
    assert [row for _, row in read_jsonl(path)] == [{"old": True}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_prompt_of_returns_the_prompt():
    assert prompt_of({"prompt": "hi", "id": 3, "source": "x", "extra": 1}) == "hi"
    assert prompt_of({"id": "a", "prompt": ""}) == ""
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert prompt_of({"messages": messages}) == messages


@pytest.mark.parametrize("row, phrase", [
    ({"id": 1}, 'exactly one of "prompt"'),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 'exactly one of "prompt"'),
    ({"prompt": 5}, '"prompt" must be a string, got int'),
    ({"prompt": None}, '"prompt" must be a string, got NoneType'),
    ({"messages": "hi"}, '"messages" must be a non-empty list'),
    ({"messages": []}, '"messages" must be a non-empty list'),
    ({"messages": [{"role": "user"}]}, 'messages[0] must be an object with "role" and "content"'),
    ({"messages": [{"role": "user", "content": "a"}, "b"]}, "messages[1] must be"),
    ({"messages": [{"role": 1, "content": "a"}]}, "messages[0] must be"),
    ({"id": [1], "prompt": "a"}, '"id" must be a string or an integer, got [1]'),
    ({"id": True, "prompt": "a"}, '"id" must be a string or an integer, got True'),
    ({"id": 1.5, "prompt": "a"}, '"id" must be a string or an integer'),
    ({"messages": [{"role": "user", "content": 7, "pad": "x" * 500}]}, "got {'role': 'user', 'content': 7,"),
])
def test_prompt_of_rejects_malformed_rows(row, phrase):
    with pytest.raises(ValueError) as info:
        prompt_of(row)
    assert phrase in str(info.value), f"{json.dumps(row)}: {info.value}"
    assert len(str(info.value)) < 200, str(info.value)  # a long value is cut, the message stays one short line


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o027])
def test_atomic_write_gives_the_umask_permissions(tmp_path, mask):
    """What open() would give (0o666 less the umask), not mkstemp's 0600; for a new file and a replaced one."""
    with umask_set(mask):
        assert umask() == mask and umask() == mask  # read without being changed
        new = atomic_write(tmp_path / "new.txt", "x")
        old = tmp_path / "old.txt"
        old.write_text("before")
        os.chmod(old, 0o600)
        atomic_write(old, b"after")
    assert mode(new) == mode(old) == 0o666 & ~mask, (oct(mode(new)), oct(mode(old)))
    assert old.read_bytes() == b"after" and sorted(p.name for p in tmp_path.iterdir()) == ["new.txt", "old.txt"]
