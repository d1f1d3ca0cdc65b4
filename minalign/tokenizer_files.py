"""What the JSON files of a Hugging Face checkpoint's tokenizer declare: added tokens (content, id, special) and
the special-token roles (bos/eos/unk/pad), one file at a time; tokenizer.load_tokenizer takes their union and
refuses contradictions.

    tokenizer.json            "added_tokens": [{"id", "content", "special", ...}]
    tokenizer_config.json     "added_tokens_decoder": {"<id>": {"content", "special"}}, roles, additional_special_tokens
    added_tokens.json         {content: id}
    special_tokens_map.json   roles, additional_special_tokens
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The special-token roles a checkpoint may name (keys of tokenizer_config.json / special_tokens_map.json).
ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass
class Decl:
    """One file's statement about an added token: its content, id (None if only named) and specialness."""

    content: str
    id: int | None
    special: bool
    source: str  # file name, for error messages


def read_json(path: Path) -> dict | None:
    """Parsed JSON object of ``path``, or None if the file does not exist."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _content(value, source: str, key: str) -> str | None:
    """A token given as a string or as a dict with "content" (Hugging Face writes both)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{source}: {key} must be a string or an object with a 'content' string, got {value!r}")


def _as_id(value, source: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
        raise ValueError(f"{source}: {key} must be an integer token id, got {value!r}")
    return int(value)


def declarations(name: str, obj: dict) -> tuple[list[Decl], dict[str, str | None]]:
    """The added tokens and special-token roles one JSON file declares."""
    decls: list[Decl] = []
    if name == "tokenizer.json":
        entries = obj.get("added_tokens") or []
        if not isinstance(entries, list):
            raise ValueError(f"{name}: 'added_tokens' must be a list")
        for k, e in enumerate(entries):
            if not isinstance(e, dict) or not isinstance(e.get("content"), str):
                raise ValueError(f"{name}: added_tokens[{k}] needs a 'content' string, got {e!r}")
            decls.append(Decl(e["content"], _as_id(e.get("id"), name, f"added_tokens[{k}].id"),
                               bool(e.get("special", False)), name))
        return decls, {}
    if name == "added_tokens.json":
        for content, i in obj.items():
            decls.append(Decl(content, _as_id(i, name, repr(content)), False, name))
        return decls, {}
    # tokenizer_config.json and special_tokens_map.json name roles and additional special tokens.
    if name == "tokenizer_config.json":
        decoder = obj.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise ValueError(f"{name}: 'added_tokens_decoder' must be an object")
        for i, e in decoder.items():
            content = _content(e, name, f"added_tokens_decoder[{i!r}]")
            special = bool(e.get("special", False)) if isinstance(e, dict) else False
            decls.append(Decl(content, _as_id(i, name, f"added_tokens_decoder key {i!r}"), special, name))
    roles = {r: _content(obj[r], name, r) for r in ROLES if r in obj}
    extra = obj.get("additional_special_tokens") or []
    if not isinstance(extra, list):
        raise ValueError(f"{name}: 'additional_special_tokens' must be a list")
    named = [c for c in roles.values() if c is not None]
    named += [_content(v, name, f"additional_special_tokens[{k}]") for k, v in enumerate(extra)]
    decls += [Decl(c, None, True, name) for c in named]
    return decls, roles
