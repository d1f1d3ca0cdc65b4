"""Sentencepiece tokenizer plus the added tokens a Hugging Face checkpoint declares.

A Mistral/Mixtral checkpoint directory holds a sentencepiece ``tokenizer.model``
and, optionally, JSON files that declare extra ("added") tokens on top of it:

- ``tokenizer.json``          ``"added_tokens": [{"id", "content", "special", ...}]``
- ``tokenizer_config.json``   ``"added_tokens_decoder": {"<id>": {"content", "special", ...}}``,
                              ``bos_token``/``eos_token``/``pad_token``/``unk_token``,
                              ``additional_special_tokens``, ``add_bos_token``, ``add_eos_token``
- ``added_tokens.json``       ``{content: id}``
- ``special_tokens_map.json`` ``bos_token``/``eos_token``/``pad_token``/``unk_token``,
                              ``additional_special_tokens``

``load_tokenizer`` takes the union of what those files declare and refuses
contradictions (one content with two ids, one id with two contents, two different
EOS tokens), naming both files. Only the added-token parts of ``tokenizer.json``
are read: plain text is always tokenized by sentencepiece itself.

Text is text. ``encode(text)`` is sentencepiece's encoding of the whole string: an
added-token string typed into it (``"</s>"``, ``"<|user|>"``) is encoded as those
characters, never as the control token, as mistral-common encodes message content
(``SentencePieceTokenizer.encode`` is ``sp.encode``) and as transformers does with
``split_special_tokens=True``. Control tokens come from whoever builds the sequence: the
chat templates (``minalign.chat``) insert theirs by id, and a caller that means the
literals of its own string as tokens asks for it with ``parse_special=True``.

``parse_special=True`` follows Hugging Face's ``legacy=True`` behaviour (transformers'
default, which parses added tokens in any text): the text is split on added-token
strings, each added token becomes its id, and each plain-text run between them is
encoded by sentencepiece on its own, so every run gets sentencepiece's dummy-prefix space.
The sentencepiece pieces for BOS, EOS and UNK (``<s>``, ``</s>``, ``<unk>``) are
always treated as added special tokens there, as Hugging Face does, so a parsed ``"<s>"``
becomes the BOS id rather than the characters ``<``, ``s``, ``>``. ``encode_parts`` mixes the
two in one sequence: a template's literals parsed, message contents not, plain text across
the parts one sentencepiece run.

The ``lstrip``/``rstrip``/``single_word``/``normalized`` flags of added tokens are
ignored: Mistral and Merlinite set them all to false, which is what this module does.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import sentencepiece as spm

from minalign.data import atomic_write
from minalign.errors import CheckpointError
from minalign.tokenizer_files import ROLES, Decl, declarations, read_json

__all__ = ["Tokenizer", "load_tokenizer"]

# The names a checkpoint gives its sentencepiece model, in the order they are looked for.
SP_MODEL_FILES = ("tokenizer.model", "spm.model")


class Tokenizer:
    """Sentencepiece model + atomic added tokens, with Hugging Face ``legacy=True`` semantics."""

    def __init__(
        self,
        sp: spm.SentencePieceProcessor,
        added_tokens: dict[str, int] | None = None,
        special_tokens: set[str] | None = None,
        roles: dict[str, str | None] | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
    ):
        """Wrap ``sp``; ``roles`` maps e.g. "eos_token" to its content, missing roles default to the model's pieces."""
        self.sp = sp
        self.sp_size = sp.get_piece_size()
        # The model's own BOS/EOS/UNK/PAD pieces are always atomic special tokens (see module docstring).
        model_ids = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(),
                     "unk_token": sp.unk_id(), "pad_token": sp.pad_id()}
        model_roles = {r: sp.id_to_piece(i) for r, i in model_ids.items() if i >= 0}  # sentencepiece uses -1 for "none"
        self.added_tokens: dict[str, int] = {sp.id_to_piece(i): i for i in model_ids.values() if i >= 0}
        self.added_tokens.update(added_tokens or {})

        roles = roles or {}
        if set(roles) - set(ROLES):
            raise ValueError(f"unknown special-token roles {sorted(set(roles) - set(ROLES))}; known: {list(ROLES)}")
        # A role given as None means "none" (e.g. Mistral's pad_token: null), not "the model's piece".
        self.roles: dict[str, str | None] = {r: roles[r] if r in roles else model_roles.get(r) for r in ROLES}
        for role, content in self.roles.items():
            if content is not None and content not in self.added_tokens:
                raise ValueError(f"{role} {content!r} is neither an added token "
                                 "nor a control piece of the sentencepiece model")
        role_tokens = {c for c in self.roles.values() if c is not None}
        self._special_names: set[str] = set(model_roles.values()) | role_tokens | set(special_tokens or ())
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token

        self.id_to_added: dict[int, str] = {i: s for s, i in self.added_tokens.items()}
        if len(self.id_to_added) != len(self.added_tokens):
            raise ValueError(f"two added tokens share an id: {self.added_tokens}")
        for content, i in self.added_tokens.items():
            _check_added(sp, content, i, "added_tokens")
        self.special_ids: set[int] = {self.added_tokens[s] for s in self._special_names}
        # Longest first: a token that is a prefix of another ("<x>" of "<x>y") must not win the match.
        alternatives = sorted(self.added_tokens, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None

    # ----------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Number of ids: sentencepiece pieces plus the added tokens beyond them."""
        return max([self.sp_size - 1, *self.added_tokens.values()]) + 1

    @property
    def bos_id(self) -> int | None:
        """Id of the BOS token, or None if the tokenizer has none."""
        return self._role_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        """Id of the EOS token (for Merlinite ``<|endoftext|>``), or None."""
        return self._role_id("eos_token")

    @property
    def unk_id(self) -> int | None:
        """Id of the unknown token, or None."""
        return self._role_id("unk_token")

    @property
    def pad_id(self) -> int | None:
        """Id of the padding token, or None (Mistral has none)."""
        return self._role_id("pad_token")

    @property
    def bos_token(self) -> str | None:
        """String of the BOS token, e.g. ``"<s>"``."""
        return self.roles["bos_token"]

    @property
    def eos_token(self) -> str | None:
        """String of the EOS token, e.g. ``"</s>"`` or ``"<|endoftext|>"``."""
        return self.roles["eos_token"]

    def _role_id(self, role: str) -> int | None:
        content = self.roles[role]
        return None if content is None else self.added_tokens[content]

    def is_special(self, content: str) -> bool:
        """Whether ``content`` is an added token marked special (skipped by ``decode`` by default)."""
        return content in self._special_names

    # ----------------------------------------------------------------- lookups
    def token_to_id(self, token: str) -> int:
        """Id of an added token or sentencepiece piece; KeyError if there is none."""
        if token in self.added_tokens:
            return self.added_tokens[token]
        i = self.sp.piece_to_id(token)
        # piece_to_id answers unk_id for unknown pieces, so check the round trip.
        if 0 <= i < self.sp_size and self.sp.id_to_piece(i) == token:
            return i
        raise KeyError(f"{token!r} is neither an added token nor a piece of the sentencepiece model")

    def id_to_token(self, i: int) -> str:
        """Added-token content or sentencepiece piece for id ``i``; ValueError if out of range."""
        self._check_id(i)
        return self.id_to_added[i] if i in self.id_to_added else self.sp.id_to_piece(i)

    def _check_id(self, i: int) -> None:
        if not (0 <= i < self.sp_size or i in self.id_to_added):
            raise ValueError(f"token id {i} is out of range "
                             f"(vocab_size {self.vocab_size}, sentencepiece has {self.sp_size})")

    # ----------------------------------------------------------------- encode/decode
    def encode(self, text: str, bos: bool = False, eos: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids of ``text``, which is plain text: ``sp.encode(text)``, added-token strings in it included.

        ``parse_special=True`` makes the added-token strings in ``text`` those tokens, each plain run between them
        encoded by ``sp.encode`` alone (HF ``legacy=True``): only for text whose literals the caller wrote as
        control tokens, never for user content. ``bos``/``eos`` add BOS/EOS unless the ids already begin/end with
        that token.
        """
        return self.encode_parts([(text, parse_special)], bos=bos, eos=eos)

    def encode_parts(self, parts, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of the concatenated texts of ``parts``, pairs ``(text, parse_special)``.

        Added-token strings are tokens only inside parts with ``parse_special`` true; all other text, across
        part boundaries, is cut only at those tokens, each run encoded by ``sp.encode`` alone. So
        ``encode_parts([(t, False)]) == encode(t)``, and a chat template's ``[("<|user|>\\n", True),
        (content, False)]`` gives the ``<|user|>`` id, then ``sp.encode("\\n" + content)`` whatever the content holds.
        ``bos``/``eos`` as for ``encode``.
        """
        ids: list[int] = []
        run: list[str] = []  # plain text waiting for sentencepiece
        for text, parse_special in parts:
            if not isinstance(text, str):
                raise TypeError(f"expected text to encode as a str, got {type(text).__name__}")
            pieces = self._split_re.split(text) if parse_special and self._split_re else [text]
            # re.split with one capture group alternates plain runs (even) and added tokens (odd).
            for k, piece in enumerate(pieces):
                if k % 2:
                    ids.extend(self.sp.encode("".join(run)) if any(run) else [])
                    run = []
                    ids.append(self.added_tokens[piece])
                else:
                    run.append(piece)
        if any(run):
            ids.extend(self.sp.encode("".join(run)))
        if bos:
            if self.bos_id is None:
                raise ValueError("bos=True, but this tokenizer has no BOS token")
            if not ids or ids[0] != self.bos_id:
                ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id is None:
                raise ValueError("eos=True, but this tokenizer has no EOS token")
            if not ids or ids[-1] != self.eos_id:
                ids.append(self.eos_id)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``: plain runs via ``sp.decode``, added tokens as their content unless special and skipped.

        Each run is decoded on its own, so its dummy-prefix space is dropped and ``decode``
        inverts ``encode`` (transformers instead keeps it as a space after a special token).
        """
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)  # accept tensors / numpy ints
            self._check_id(i)
            if i not in self.id_to_added:
                run.append(i)
                continue
            if run:
                out.append(self.sp.decode(run))
                run = []
            if not (skip_special_tokens and i in self.special_ids):
                out.append(self.id_to_added[i])
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    # ----------------------------------------------------------------- saving
    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.model and the Hugging Face JSON files that ``load_tokenizer`` reads back identically."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        role_tokens = {c for c in self.roles.values() if c is not None}
        by_id = sorted(self.added_tokens.items(), key=lambda kv: kv[1])
        config = {
            "tokenizer_class": "LlamaTokenizer",
            # Tells transformers to tokenize each plain run on its own, as we do.
            "legacy": True,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "added_tokens_decoder": {
                str(i): {"content": c, "special": self.is_special(c), "lstrip": False, "rstrip": False,
                         "normalized": False, "single_word": False}
                for c, i in by_id
            },
            **self.roles,
            "additional_special_tokens": [c for c, _ in by_id if self.is_special(c) and c not in role_tokens],
        }
        special_map = {r: c for r, c in self.roles.items() if c is not None}
        special_map["additional_special_tokens"] = config["additional_special_tokens"]
        # Like Hugging Face, added_tokens.json lists only the tokens beyond the sentencepiece vocabulary.
        beyond = {c: i for c, i in by_id if i >= self.sp_size}
        atomic_write(d / "tokenizer.model", self.sp.serialized_model_proto())
        atomic_write(d / "tokenizer_config.json", _json_bytes(config))
        atomic_write(d / "special_tokens_map.json", _json_bytes(special_map))
        atomic_write(d / "added_tokens.json", _json_bytes(beyond))

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, sp_size={self.sp_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, pad={self.roles['pad_token']!r}, added={len(self.added_tokens)})")


def _check_added(sp: spm.SentencePieceProcessor, content: str, i: int, source: str) -> None:
    """An added token needs a non-negative id, and below the sentencepiece size it must be that very piece."""
    if i < 0:
        raise ValueError(f"{source}: added token {content!r} has negative id {i}")
    if i < sp.get_piece_size() and sp.id_to_piece(i) != content:
        raise ValueError(f"{source}: added token {content!r} has id {i}, but piece {i} of tokenizer.model "
                         f"is {sp.id_to_piece(i)!r}")


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load ``tokenizer.model`` (or DeBERTa-v3's ``spm.model``) plus the added tokens declared by the JSON files of
    checkpoint directory ``path``; a CheckpointError names the file and token at fault."""
    try:
        return _read(Path(path))
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _read(d: Path) -> Tokenizer:
    if not d.is_dir():
        raise FileNotFoundError(f"tokenizer directory {d} does not exist (or is not a directory)")
    # Mistral names its sentencepiece model tokenizer.model; DeBERTa-v3 (PairRM's backbone) names it spm.model.
    model_file = next((d / n for n in SP_MODEL_FILES if (d / n).is_file()), None)
    if model_file is None:
        raise FileNotFoundError(f"{d}: no sentencepiece model found: a checkpoint needs "
                                f"{' or '.join(SP_MODEL_FILES)}")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(model_file))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{model_file} is not a sentencepiece model: {e}") from None
    decls: list[Decl] = []
    roles: dict[str, tuple[str | None, str]] = {}  # role -> (content, file that named it)
    config: dict = {}
    for name in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
        obj = read_json(d / name)
        if obj is None:
            continue
        if name == "tokenizer_config.json":
            config = obj
        file_decls, file_roles = declarations(name, obj)
        decls += file_decls
        for role, content in file_roles.items():
            # An explicit null ("no pad token") yields to a file that names the token.
            if role in roles and None not in (roles[role][0], content) and roles[role][0] != content:
                raise ValueError(f"{role} is {roles[role][0]!r} in {roles[role][1]} but {content!r} in {name}")
            if content is not None or role not in roles:
                roles[role] = (content, name)

    # Union the declarations that carry ids; contradictions name both files.
    ids: dict[str, tuple[int, str]] = {}
    contents: dict[int, tuple[str, str]] = {}
    for dcl in decls:
        if dcl.id is None:
            continue
        if dcl.content in ids and ids[dcl.content][0] != dcl.id:
            raise ValueError(f"added token {dcl.content!r} has id {ids[dcl.content][0]} in {ids[dcl.content][1]} "
                             f"but id {dcl.id} in {dcl.source}")
        if dcl.id in contents and contents[dcl.id][0] != dcl.content:
            raise ValueError(f"id {dcl.id} is {contents[dcl.id][0]!r} in {contents[dcl.id][1]} "
                             f"but {dcl.content!r} in {dcl.source}")
        _check_added(sp, dcl.content, dcl.id, dcl.source)
        ids[dcl.content] = (dcl.id, dcl.source)
        contents[dcl.id] = (dcl.content, dcl.source)

    # Tokens only named (as a role or additional special token) must get an id somewhere.
    added = {c: i for c, (i, _) in ids.items()}
    for dcl in decls:
        if dcl.id is None and dcl.content not in added:
            i = sp.piece_to_id(dcl.content)
            if sp.id_to_piece(i) != dcl.content:
                raise ValueError(f"{dcl.source} names token {dcl.content!r}, but no file gives it an id "
                                 f"and it is not a piece of {model_file.name}")
            added[dcl.content] = i
    special = {dcl.content for dcl in decls if dcl.special}

    return Tokenizer(
        sp,
        added_tokens=added,
        special_tokens=special,
        roles={r: c for r, (c, _) in roles.items()},
        add_bos_token=bool(config.get("add_bos_token", True)),
        add_eos_token=bool(config.get("add_eos_token", False)),
    )
