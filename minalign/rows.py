"""Every row kind minalign reads, parsed and validated in one place; errors are ValueErrors saying what is wrong
(the reader adds path:line: rows.BadRows, data.read_jsonl).

    prompts   {"id"?, "prompt": str} | {"id"?, "messages": [{"role", "content"}...]}, "source"?      prompt_of
    samples   {"id", "prompt": str | messages, "prompt_token_ids", "responses": [{"text", "token_ids",
              "logprobs", "finish_reason"}...]}                         sample_prompt, response_token_ids, response_texts
    scores    samples rows whose responses gained "reward" (and, for the log-ratio, its sums)   (select.py reads them)
    SFT       {"messages"} | {"prompt", "response"}                                               sft_messages
    DPO       {"prompt", "chosen", "rejected"}: strings, or conversations ending in the reply     dpo_parts
              (UltraFeedback-binarized)

A prompt is a string (one user message) or a messages list; `as_messages` turns either into messages. Which role
sequences a template accepts is chat.py's business, not this file's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from minalign.data import read_jsonl, short_repr
from minalign.errors import DataError, MinalignError


class BadRows:
    """The on_error of read_jsonl, and of a stage's own row checks: stop at the first bad row (a DataError naming
    path:line), or with skip_invalid keep going and collect them in .skipped. switch: how the user says "skip
    invalid rows" (a flag or a key), for the message (None: there is no such switch)."""

    def __init__(self, skip_invalid: bool, switch: str | None = "--skip-invalid"):
        self.skip_invalid, self.switch, self.skipped = skip_invalid, switch, []

    def __call__(self, err: DataError) -> None:
        if not self.skip_invalid:
            hint = f" ({self.switch} skips bad rows)" if self.switch else ""
            raise DataError(err.path, err.line, err.message + hint)
        self.skipped.append(err)


# --------------------------------------------------------------------------------------------------- prompts

def messages_of(messages, key: str) -> list[dict]:
    """messages, the value of field key, checked to be a non-empty list of {"role", "content"} strings."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'"{key}" must be a non-empty list, got {short_repr(messages)}')
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f'{key}[{i}] must be an object with "role" and "content" strings, got {short_repr(m)}')
    return messages


def prompt_of(row: dict) -> str | list[dict]:
    """The prompt of a prompts.jsonl row: its "prompt" string or its "messages" list; ValueError if malformed.

    Only the shape is checked here ("role"/"content" strings); which role sequences a template accepts is
    chat.render_prompt's business. An "id", when present, must be a string or an integer.
    """
    if "id" in row and (isinstance(row["id"], bool) or not isinstance(row["id"], (str, int))):
        raise ValueError(f'"id" must be a string or an integer, got {short_repr(row["id"])}')
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


def prompt_rows(path: Path, bad: Callable[[DataError], None],
                render: Callable[[str | list[dict]], object] | None = None) -> Iterator[tuple[int, dict, object]]:
    """(line, row, render(prompt)) of every valid row of a prompts file (the prompt itself without render), the row
    given its line number as "id" when it has none. A malformed row, one that render refuses (a ValueError: the
    template or the context), or a duplicate id goes to bad (BadRows: stop, or skip and collect)."""
    seen: dict = {}  # id -> the line that first used it
    for line, row in read_jsonl(path, on_error=bad):
        try:
            prompt = prompt_of(row)
            rendered = render(prompt) if render is not None else prompt
        except ValueError as e:
            bad(DataError(path, line, str(e)))
            continue
        row = {"id": line, **row}
        if row["id"] in seen:
            bad(DataError(path, line, f"duplicate id {row['id']!r} (first at line {seen[row['id']]})"))
            continue
        seen[row["id"]] = line
        yield line, row, rendered


def read_prompts(path: Path, render: Callable[[str | list[dict]], object] | None = None) -> list[dict]:
    """Every row of a prompts file, checked (by render too: prompt_rows), each with an "id"; the first bad one is
    a DataError naming path:line."""
    rows = [row for _, row, _ in prompt_rows(path, BadRows(False, switch=None), render)]
    if not rows:
        raise MinalignError(f"{path}: no prompts")
    return rows


# ------------------------------------------------------------------------------------------ samples and scores

def sample_prompt(row: dict) -> list[dict]:
    """The prompt of a samples row as messages: "prompt" is a string (one user message) or a messages list."""
    if "prompt" not in row:
        raise ValueError(f'a samples row needs a "prompt" (a string or a list of messages); got keys {sorted(row)}')
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return as_messages(prompt)
    if not isinstance(prompt, list):
        raise ValueError(f'"prompt" must be a string or a list of messages, got {type(prompt).__name__}')
    return messages_of(prompt, "prompt")


def _responses(row: dict) -> list:
    responses = row.get("responses")
    if not isinstance(responses, list) or not responses:
        raise ValueError(f'a samples row needs a non-empty "responses" list; got '
                         f'{"no such key" if "responses" not in row else type(responses).__name__}')
    return responses


def response_token_ids(row: dict) -> list[list[int]]:
    """The token ids of each response of a samples row; ValueError if "responses" or a "token_ids" is malformed."""
    out = []
    for j, r in enumerate(_responses(row)):
        ids = r.get("token_ids") if isinstance(r, dict) else None
        if not (isinstance(ids, list) and ids and all(type(i) is int for i in ids)):
            raise ValueError(f'responses[{j}] needs "token_ids", a non-empty list of integers')
        out.append(ids)
    return out


def response_texts(row: dict) -> list[str]:
    """The text of each response of a samples row; ValueError if "responses" or a "text" is malformed."""
    out = []
    for j, r in enumerate(_responses(row)):
        if not (isinstance(r, dict) and isinstance(r.get("text"), str)):
            raise ValueError(f'responses[{j}] needs a "text" string')
        out.append(r["text"])
    return out


def training_prompt(row: dict, system: str):
    """The prompt of a scores row for a training row: as sampled, with the system message sampling added."""
    return as_messages(row["prompt"], system) if system else row["prompt"]


# --------------------------------------------------------------------------------------------- training rows

def _training_prompt_messages(row: dict) -> list[dict]:
    """The "prompt" (a string or messages) of an SFT or DPO row, as messages."""
    return as_messages(prompt_of({k: row[k] for k in ("prompt", "id") if k in row} if "prompt" in row else row))


def sft_messages(row: dict) -> list[dict]:
    """The conversation of an SFT row: its "messages", or its "prompt" followed by its "response" as the reply."""
    if "messages" in row:
        return messages_of(row["messages"], "messages")
    if not isinstance(row.get("response"), str):
        raise ValueError('an SFT row needs "messages", or "prompt" and a "response" string')
    return _training_prompt_messages(row) + [{"role": "assistant", "content": row["response"]}]


def _reply(row: dict, key: str, prompt: list[dict]) -> str:
    """The assistant reply of a DPO row's chosen/rejected: a string, or a conversation that is the prompt's
    messages plus the reply (UltraFeedback-binarized)."""
    value = row.get(key)
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError(f'"{key}" must be a string or a list of messages, got {type(value).__name__}')
    messages = messages_of(value, key)
    if messages[-1]["role"] != "assistant":
        raise ValueError(f'"{key}" must end with an assistant message')
    if messages[:-1] != prompt:
        raise ValueError(f'"{key}": the conversation before its last reply differs from "prompt"')
    return messages[-1]["content"]


def dpo_parts(row: dict) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen reply, rejected reply) of a DPO row."""
    if not all(k in row for k in ("prompt", "chosen", "rejected")):
        raise ValueError(f'a DPO row needs "prompt", "chosen" and "rejected"; got keys {sorted(row)}')
    prompt = _training_prompt_messages(row)
    return prompt, _reply(row, "chosen", prompt), _reply(row, "rejected", prompt)
