"""Chat templates: render conversations to text and to token ids with a training label mask.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}``:
an optional system message first, then user and assistant turns alternating,
starting with the user. Templates (``TEMPLATES``):

``merlinite`` (InstructLab / IBM LAB, Merlinite-7B)::

    <s><|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{reply}<|endoftext|>\\n<|user|>\\n...

  As in InstructLab's ``ibm_generic_tmpl`` (github.com/instructlab/training,
  src/instructlab/training/chat_templates/ibm_generic_tmpl.py), an assistant turn
  ends with ``<|endoftext|>`` and, unless it is the last message, a newline
  follows before the next ``<|user|>``. With no system message the model card's
  default system prompt is used. The leading ``<s>`` is the BOS that Mistral's
  tokenizer adds by default (Hugging Face ``add_bos_token: true``; llama.cpp too),
  i.e. what a Merlinite prompt gets when, as in InstructLab's examples, the bare
  prompt string is handed to the tokenizer. InstructLab's later training library
  (instructlab/training, tokenizer_utils.setup_tokenizer, June 2024) turns
  ``add_bos_token`` off and its template has no BOS, so models tuned with it saw no ``<s>``.

``mistral`` (Mistral-7B-Instruct-v0.1/v0.2, Mixtral-8x7B-Instruct-v0.1)::

    <s>[INST] {user} [/INST]{reply}</s>[INST] {user} [/INST]{reply}</s>

  the original Hugging Face chat template of Mistral-7B-Instruct-v0.1. A system
  message is folded into the first user turn as ``system + "\\n\\n" + user``, as
  mistral-common's V1 tokenizer does (``SentencePieceInstructTokenizerV1``).

``raw`` (base models): ``<s>`` + the contents concatenated, each reply followed by
``</s>`` (the base Mistral/Mixtral BOS/EOS).

Control tokens typed into a message are text. A template is built from its own
literals (``<s>``, ``<|user|>\\n``, ``[INST] ``, ``</s>``, ...) and the message contents;
only the literals are parsed for added tokens, so ``</s>``, ``<s>``, ``[INST]``,
``<|user|>``, ``<|assistant|>``, ``<|endoftext|>`` or any other added-token string inside a
system, user or assistant content is encoded as its characters and can neither end a
turn nor forge one. mistral-common does the same (it encodes every content with
``sp.encode``; only the instruct tokenizer adds BOS/EOS). This holds for everything built
on these functions: sampling and scoring prompts (``render_prompt``) and training
examples (``render_conversation``; the DPO trainer's ``tokenizer.encode(reply)``, whose
default is plain text).

Tokenization rule. The rendered text is a sequence of segments and each segment is
encoded on its own with ``Tokenizer.encode_parts`` (the template's added tokens atomic,
the plain text between them, contents included, one sentencepiece run with its dummy
prefix). Every assistant reply is a segment by itself, so its
ids are exactly ``tokenizer.encode(reply)``, whatever precedes it. This is how
mistral-common tokenizes assistant turns (``encode_assistant_message`` encodes the
content alone and appends EOS), and it makes a generation prompt an exact prefix of
the conversation that has the reply appended. It differs from tokenizing the whole
rendered string at once only at the start of each reply: there the reply's first
word gets sentencepiece's "▁" even after ``[/INST]`` or ``<|assistant|>\\n``. (Mistral's
own docs write that "▁" as the space in ``[/INST] Fine, and you?</s>``.)
The segments' texts concatenate to ``render_text`` byte for byte; that string is for
reading: tokenizing it with ``parse_special=True`` gives ``render_conversation``'s ids only
when no content holds an added-token string (transformers' ``apply_chat_template``
tokenizes such a string, contents' literals parsed, which is what this module avoids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from minalign.tokenizer import Tokenizer

__all__ = ["TEMPLATES", "MERLINITE_SYSTEM_PROMPT", "render_text", "render_conversation", "render_prompt",
           "end_token_id"]

# Default system prompt from the Merlinite-7B model card (also InstructLab's _SYS_PROMPT).
MERLINITE_SYSTEM_PROMPT = (
    "You are an AI language model developed by IBM Research. You are a cautious assistant. "
    "You carefully follow instructions. You are helpful and harmless and you follow ethical "
    "guidelines and promote positive behavior."
)

# A template's piece: (text, is_target, is_literal). Targets are the assistant replies and their end token;
# literals are the template's own text, parsed for added tokens; the rest is message content, always plain text.
Piece = tuple[str, bool, bool]
# A segment: (parts for Tokenizer.encode_parts, i.e. [(text, parse_special)], is_target).
Segment = tuple[list[tuple[str, bool]], bool]


def _lit(text: str) -> Piece:
    return (text, False, True)


def _content(text: str) -> Piece:
    return (text, False, False)


def _split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    """Validate the conversation shape; return (system content or None, the user/assistant turns)."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: expected a dict with role 'system', 'user' or 'assistant', got {m!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} ({m['role']}): content must be a string, got {m.get('content')!r}")
    system = None
    turns = list(messages)
    if turns and turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
    offset = len(messages) - len(turns)
    for k, m in enumerate(turns):
        expected = "user" if k % 2 == 0 else "assistant"
        if m["role"] != expected:
            rule = ("a system message may only come first" if m["role"] == "system"
                    else "after an optional system message, roles alternate user/assistant")
            raise ValueError(f"message {k + offset} has role {m['role']!r}, expected {expected!r} ({rule})")
    return system, turns


def _reply(content: str, end: str) -> list[Piece]:
    return [(content, True, False), (end, True, True)]


def _merlinite(system: str | None, turns: list[dict], add_generation_prompt: bool) -> list[Piece]:
    system = MERLINITE_SYSTEM_PROMPT if system is None else system
    out: list[Piece] = [_lit("<s><|system|>\n"), _content(system), _lit("\n")]
    for k, m in enumerate(turns):
        if m["role"] == "user":
            # ibm_generic_tmpl: "\n" after <|endoftext|> unless the assistant turn was the last message.
            out += [_lit(("\n" if k else "") + "<|user|>\n"), _content(m["content"]), _lit("\n")]
        else:
            out += [_lit("<|assistant|>\n"), *_reply(m["content"], "<|endoftext|>")]
    if add_generation_prompt:
        out.append(_lit("<|assistant|>\n"))
    return out


def _mistral(system: str | None, turns: list[dict], add_generation_prompt: bool) -> list[Piece]:
    if system is not None and not turns:
        raise ValueError("mistral template: a system message needs a user message to be folded into")
    out: list[Piece] = [_lit("<s>")]
    for k, m in enumerate(turns):
        if m["role"] == "user":
            folded = [_content(system), _lit("\n\n")] if k == 0 and system else []
            out += [_lit("[INST] "), *folded, _content(m["content"]), _lit(" [/INST]")]
        else:
            out += _reply(m["content"], "</s>")
    return out  # the prompt already ends with " [/INST]": nothing to add for generation


def _raw(system: str | None, turns: list[dict], add_generation_prompt: bool) -> list[Piece]:
    out: list[Piece] = [_lit("<s>"), _content(system or "")]
    for m in turns:
        out += [_content(m["content"])] if m["role"] == "user" else _reply(m["content"], "</s>")
    return out


@dataclass(frozen=True)
class ChatTemplate:
    """A named template: the added tokens it needs and its builder (system, turns, add_generation_prompt) -> pieces."""

    name: str
    required_tokens: tuple[str, ...]
    build: Callable[[str | None, list[dict], bool], list[Piece]]


TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate("merlinite", ("<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>"), _merlinite),
        ChatTemplate("mistral", ("<s>", "</s>"), _mistral),
        ChatTemplate("raw", ("<s>", "</s>"), _raw),
    )
}


def _template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known templates: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def _segments(template: str, messages: list[dict], add_generation_prompt: bool) -> list[Segment]:
    """Segments of the rendered conversation, adjacent non-target text merged into one segment."""
    tmpl = _template(template)
    system, turns = _split_system(messages)
    if add_generation_prompt and (not turns or turns[-1]["role"] != "user"):
        raise ValueError("a generation prompt needs a conversation that ends with a user message")
    merged: list[Segment] = []
    for text, target, literal in tmpl.build(system, turns, add_generation_prompt):
        # Merged, all text between replies is one run of plain text between the template's added tokens (as
        # transformers would tokenize it), so the only cuts are those tokens and the replies' edges, wherever a
        # builder happened to split its pieces.
        if merged and not target and not merged[-1][1]:
            merged[-1][0].append((text, literal))
        else:
            merged.append(([(text, literal)], target))
    return merged


def _encode(tokenizer: Tokenizer, template: str, segments: list[Segment]) -> tuple[list[int], list[bool]]:
    missing = [t for t in _template(template).required_tokens if t not in tokenizer.added_tokens]
    if missing:
        raise ValueError(f"chat template {template!r} needs token(s) {missing}, which the tokenizer does not define "
                         f"as added tokens (it has {sorted(tokenizer.added_tokens)})")
    ids: list[int] = []
    mask: list[bool] = []
    for parts, target in segments:
        seg = tokenizer.encode_parts(parts)
        ids += seg
        mask += [target] * len(seg)
    return ids, mask


def render_text(template: str, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The exact rendered string of ``messages`` (plus the assistant header if ``add_generation_prompt``)."""
    return "".join(text for parts, _ in _segments(template, messages, add_generation_prompt) for text, _ in parts)


def render_conversation(tokenizer: Tokenizer, template: str, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation and a mask that is True exactly on reply tokens and their end token."""
    return _encode(tokenizer, template, _segments(template, messages, add_generation_prompt=False))


def render_prompt(tokenizer: Tokenizer, template: str, messages_or_prompt: list[dict] | str) -> list[int]:
    """Token ids up to and including the assistant header, ready for generation; a string is one user message."""
    messages = messages_or_prompt
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    ids, _ = _encode(tokenizer, template, _segments(template, messages, add_generation_prompt=True))
    return ids


def end_token_id(tokenizer: Tokenizer, template: str) -> int | None:
    """The token that ends an assistant reply in ``template`` (``<|endoftext|>`` for merlinite, ``</s>`` for mistral
    and raw), or None if replies end with no token."""
    # Render an empty reply: the last label-masked token is the end token (the builders are the one place that
    # knows how each template ends a reply).
    ids, is_reply = render_conversation(tokenizer, template, [{"role": "user", "content": "x"},
                                                              {"role": "assistant", "content": ""}])
    return ids[-1] if is_reply and is_reply[-1] else None
