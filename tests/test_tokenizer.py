"""Tests for minalign.tokenizer: sentencepiece parity, atomic added tokens, HF file formats, errors.

The reference for plain text is the bare sentencepiece processor: ``encode`` treats
added-token strings in its text as text by default, so every text equals sentencepiece's
encoding. With ``parse_special=True`` the reference is the rule "each plain run encoded by
sentencepiece on its own" written out by hand here, and, where transformers is installed,
transformers' LlamaTokenizer with ``legacy=True`` built from the same files (a test oracle only).
"""

import os

import pytest

from minalign.tokenizer import Tokenizer, load_tokenizer

PLAIN_TEXTS = [
    "Hello world",
    "The quick brown fox jumped over the lazy dog.",
    "héllo wörld",  # Latin-1 letters outside the training corpus
    "emoji 🙂🚀 and CJK 世界你好",  # byte fallback
    "two  spaces,   three and\ttab",
    "line one\nline two\n\n\nafter blank lines\n",
    "  leading and trailing spaces  ",
    " ",
    "\n",
    "digits 1234567890 2024",
    "<s> looks like BOS but is spelled out",  # text unless parse_special=True: see test_bos_piece_text_is_bos
    "</s><unk> and <|user|>\n<|assistant|>\n<|endoftext|><|system|><|pad|> typed into a message",
    "",
]


def ids_str(tok, ids):
    """Pieces of ``ids`` for readable assertion messages."""
    return [tok.id_to_token(i) for i in ids]


# --------------------------------------------------------------------------- plain text
@pytest.mark.parametrize("text", PLAIN_TEXTS)
@pytest.mark.parametrize("which", ["mistral_tokenizer", "merlinite_tokenizer"])
def test_plain_text_equals_sentencepiece(request, sp_processor, which, text):
    # Added-token strings typed into a text ("</s>", "<|user|>") are text unless the caller asks to parse them.
    tok = request.getfixturevalue(which)
    got, want = tok.encode(text), sp_processor.encode(text)
    assert got == want, f"{text!r}: got {ids_str(tok, got)}, sentencepiece gives {ids_str(tok, want)}"
    assert got == tok.encode(text, parse_special=False)
    assert not set(got) & set(tok.id_to_added), ids_str(tok, got)
    assert tok.decode(got) == text


def test_specials_in_text_are_text_unless_parsed(merlinite_tokenizer, sp_processor):
    tok, sp = merlinite_tokenizer, sp_processor
    text = "<s>Hi</s><|user|>\nx<|endoftext|>"
    assert tok.encode(text) == sp.encode(text)
    assert tok.encode(text, parse_special=True) == [1, *sp.encode("Hi"), 2, 402, *sp.encode("\nx"), 400]
    # bos/eos look at ids: "<s>"/"<|endoftext|>" spelled out in the text do not count as BOS/EOS.
    assert tok.encode(text, bos=True, eos=True) == [1, *sp.encode(text), 400]
    assert tok.encode(text, bos=True, eos=True, parse_special=True) == tok.encode(text, parse_special=True)


def test_byte_fallback_is_exercised(merlinite_tokenizer):
    # Guards the parity test above against a model that would cover these characters.
    pieces = ids_str(merlinite_tokenizer, merlinite_tokenizer.encode("🙂世"))
    assert all(p.startswith("<0x") for p in pieces if p != "▁"), pieces
    assert len(pieces) >= 7, pieces


# --------------------------------------------------------------------------- added tokens
def test_added_tokens_are_atomic_and_runs_get_dummy_prefix(merlinite_tokenizer, sp_processor):
    tok, sp = merlinite_tokenizer, sp_processor
    user, asst, eot = (tok.token_to_id(t) for t in ("<|user|>", "<|assistant|>", "<|endoftext|>"))
    text = "<|user|>Hello<|assistant|>\nworld<|endoftext|>x"
    want = [user, *sp.encode("Hello"), asst, *sp.encode("\nworld"), eot, *sp.encode("x")]
    got = tok.encode(text, parse_special=True)
    assert got == want, f"got {ids_str(tok, got)}, want {ids_str(tok, want)}"
    # Each run starts with sentencepiece's dummy prefix, even right after a special token.
    assert tok.id_to_token(got[1]).startswith("▁"), ids_str(tok, got)
    assert tok.decode(got, skip_special_tokens=False) == text


def test_adjacent_added_tokens_and_partial_matches(merlinite_tokenizer, sp_processor):
    tok = merlinite_tokenizer
    got = tok.encode("<|user|><|assistant|><|user", parse_special=True)
    want = [tok.token_to_id("<|user|>"), tok.token_to_id("<|assistant|>"), *sp_processor.encode("<|user")]
    assert got == want, f"got {ids_str(tok, got)}, want {ids_str(tok, want)}"


def test_longest_added_token_wins(sp_processor):
    # "<x>" is a prefix of "<x>y": a regex alternation in insertion order would split it.
    tok = Tokenizer(sp_processor, added_tokens={"<x>": 400, "<x>y": 401})
    assert tok.encode("<x>y<x>", parse_special=True) == [401, 400]


def test_bos_piece_text_is_bos(mistral_tokenizer, sp_processor):
    tok = mistral_tokenizer
    got = tok.encode("<s>Hi</s>", parse_special=True)
    assert got == [1, *sp_processor.encode("Hi"), 2], ids_str(tok, got)


def test_bos_eos_flags_not_doubled(merlinite_tokenizer, sp_processor):
    tok = merlinite_tokenizer
    hi = sp_processor.encode("Hi")
    assert tok.bos_id == 1 and tok.eos_id == 400  # Merlinite: eos is <|endoftext|>
    assert tok.encode("Hi", bos=True) == [1, *hi]
    assert tok.encode("<s>Hi", bos=True, parse_special=True) == [1, *hi]
    assert tok.encode("Hi", eos=True) == [*hi, tok.eos_id]
    assert tok.encode("Hi<|endoftext|>", eos=True, parse_special=True) == [*hi, tok.eos_id]
    assert tok.encode("<s>Hi<|endoftext|>", bos=True, eos=True, parse_special=True) == [1, *hi, tok.eos_id]
    assert tok.encode("", bos=True, eos=True) == [1, tok.eos_id]
    assert tok.encode("Hi</s>", eos=True, parse_special=True) == [*hi, 2, tok.eos_id], "</s> is not Merlinite's EOS"


# --------------------------------------------------------------------------- decode
def test_decode_round_trip_and_skip_specials(merlinite_tokenizer):
    tok = merlinite_tokenizer
    text = "<s><|system|>\nBe nice 🙂.\n<|user|>\nHi  there\n<|assistant|>\nHello!<|endoftext|>"
    ids = tok.encode(text, parse_special=True)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "\nBe nice 🙂.\n\nHi  there\n\nHello!"


def test_decode_keeps_non_special_added_tokens(make_tokenizer_dir):
    # added_tokens.json alone declares tokens without marking them special.
    tok = load_tokenizer(make_tokenizer_dir({"added_tokens.json": {"<tool>": 400}}))
    ids = tok.encode("a<tool>b</s>", parse_special=True)
    assert tok.decode(ids) == "a<tool>b", ids  # </s> is special and skipped, <tool> is not
    assert 400 not in tok.special_ids


@pytest.mark.parametrize("bad", [-1, 405, 10**6])
def test_decode_rejects_out_of_range_ids(merlinite_tokenizer, bad):
    with pytest.raises(ValueError, match=f"token id {bad} is out of range"):
        merlinite_tokenizer.decode([5, bad])


# --------------------------------------------------------------------------- attributes
def test_attributes_merlinite(merlinite_tokenizer):
    tok = merlinite_tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.vocab_size) == (1, 400, 401, 0, 405)
    assert tok.added_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2, "<|endoftext|>": 400, "<|pad|>": 401,
                                "<|user|>": 402, "<|assistant|>": 403, "<|system|>": 404}
    assert tok.special_ids == {0, 1, 2, 400, 401, 402, 403, 404}
    assert tok.token_to_id("<|assistant|>") == 403 and tok.id_to_token(403) == "<|assistant|>"
    assert tok.token_to_id("<0x0A>") == 13 and tok.id_to_token(13) == "<0x0A>"
    assert (tok.add_bos_token, tok.add_eos_token) == (True, False)


def test_attributes_mistral(mistral_tokenizer):
    tok = mistral_tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.vocab_size) == (1, 2, None, 0, 400)
    assert tok.added_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    with pytest.raises(KeyError, match="<\\|user\\|>"):
        tok.token_to_id("<|user|>")
    with pytest.raises(ValueError, match="out of range"):
        tok.id_to_token(400)


def test_bare_model_dir_gets_model_control_tokens(make_tokenizer_dir):
    tok = load_tokenizer(make_tokenizer_dir({}))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, None, 0)
    assert tok.added_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}


# --------------------------------------------------------------------------- file formats
ONE_FILE_DECLARATIONS = {
    "tokenizer.json": {"added_tokens": [{"id": 400, "content": "<|user|>", "special": True},
                                        {"id": 401, "content": "<|eot|>", "special": True}]},
    "tokenizer_config.json": {"added_tokens_decoder": {"400": {"content": "<|user|>", "special": True},
                                                       "401": {"content": "<|eot|>", "special": True}},
                              "eos_token": {"content": "<|eot|>", "special": True}},
    "added_tokens.json": {"<|user|>": 400, "<|eot|>": 401},
}


@pytest.mark.parametrize("filename", sorted(ONE_FILE_DECLARATIONS))
def test_each_file_format_declares_added_tokens(make_tokenizer_dir, sp_processor, filename):
    tok = load_tokenizer(make_tokenizer_dir({filename: ONE_FILE_DECLARATIONS[filename]}))
    assert tok.token_to_id("<|user|>") == 400 and tok.token_to_id("<|eot|>") == 401, tok.added_tokens
    assert tok.encode("<|user|>hi<|eot|>", parse_special=True) == [400, *sp_processor.encode("hi"), 401]
    want_eos = 401 if filename == "tokenizer_config.json" else 2
    assert tok.eos_id == want_eos


def test_special_tokens_map_sets_roles_and_specialness(make_tokenizer_dir):
    tok = load_tokenizer(make_tokenizer_dir({
        "added_tokens.json": {"<|eot|>": 400, "<|pad|>": 401, "<|tool|>": 402},
        "special_tokens_map.json": {"eos_token": "<|eot|>", "pad_token": {"content": "<|pad|>"},
                                    "additional_special_tokens": ["<|tool|>"]},
    }))
    assert (tok.eos_id, tok.pad_id) == (400, 401)
    assert {400, 401, 402} <= tok.special_ids


def test_null_pad_yields_to_named_pad(make_tokenizer_dir):
    tok = load_tokenizer(make_tokenizer_dir({
        "tokenizer_config.json": {"pad_token": None, "added_tokens_decoder": {"400": {"content": "<pad>"}}},
        "special_tokens_map.json": {"pad_token": "<pad>"},
    }))
    assert tok.pad_id == 400


# --------------------------------------------------------------------------- conflicts and errors
def test_same_content_two_ids_names_both_files(make_tokenizer_dir):
    d = make_tokenizer_dir({"tokenizer.json": {"added_tokens": [{"id": 400, "content": "<|user|>"}]},
                            "added_tokens.json": {"<|user|>": 401}})
    with pytest.raises(ValueError) as e:
        load_tokenizer(d)
    msg = str(e.value)
    assert "tokenizer.json" in msg and "added_tokens.json" in msg and "400" in msg and "401" in msg, msg


def test_one_id_two_contents_names_both_files(make_tokenizer_dir):
    d = make_tokenizer_dir({"tokenizer_config.json": {"added_tokens_decoder": {"400": {"content": "<|a|>"}}},
                            "added_tokens.json": {"<|b|>": 400}})
    with pytest.raises(ValueError) as e:
        load_tokenizer(d)
    msg = str(e.value)
    assert "tokenizer_config.json" in msg and "added_tokens.json" in msg and "<|a|>" in msg and "<|b|>" in msg, msg


def test_conflicting_roles_name_both_files(make_tokenizer_dir):
    d = make_tokenizer_dir({"tokenizer_config.json": {"eos_token": "</s>"},
                            "special_tokens_map.json": {"eos_token": "<s>"}})
    with pytest.raises(ValueError, match="eos_token.*tokenizer_config.json.*special_tokens_map.json"):
        load_tokenizer(d)


def test_low_id_must_be_that_sentencepiece_piece(make_tokenizer_dir):
    d = make_tokenizer_dir({"added_tokens.json": {"<|user|>": 5}})
    with pytest.raises(ValueError, match=r"added_tokens.json.*'<\|user\|>' has id 5.*'<0x02>'"):
        load_tokenizer(d)


def test_named_token_without_id_is_an_error(make_tokenizer_dir):
    d = make_tokenizer_dir({"special_tokens_map.json": {"pad_token": "<|pad|>"}})
    with pytest.raises(ValueError, match=r"special_tokens_map.json names token '<\|pad\|>'"):
        load_tokenizer(d)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_missing_tokenizer_model(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


def test_malformed_json_names_file(make_tokenizer_dir):
    d = make_tokenizer_dir({"added_tokens.json": '{"<|user|>": 400,'})
    with pytest.raises(ValueError, match="added_tokens.json: malformed JSON"):
        load_tokenizer(d)


def test_not_a_sentencepiece_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"this is not a protobuf\x00\xff")
    with pytest.raises(ValueError, match="tokenizer.model is not a sentencepiece model"):
        load_tokenizer(tmp_path)


# --------------------------------------------------------------------------- save
def test_save_round_trip(merlinite_tokenizer, tmp_path):
    tok = merlinite_tokenizer
    tok.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["added_tokens.json", "special_tokens_map.json",
                                           "tokenizer.model", "tokenizer_config.json"]  # no temp files left
    back = load_tokenizer(tmp_path)
    assert back.added_tokens == tok.added_tokens
    assert back.special_ids == tok.special_ids
    assert back.roles == tok.roles
    assert (back.add_bos_token, back.add_eos_token) == (tok.add_bos_token, tok.add_eos_token)
    text = "<s><|user|>\nemoji 🙂 ok<|assistant|>\nfine<|endoftext|>"
    assert back.encode(text, parse_special=True) == tok.encode(text, parse_special=True)


# --------------------------------------------------------------------------- transformers oracle
# Texts whose plain runs do not start with whitespace: there transformers' Metaspace
# pre-tokenizer skips the dummy prefix ("  x" -> "▁▁x"), while sentencepiece and
# mistral-common (and this module) add it ("▁▁▁x"). That one known difference is excluded.
ORACLE_TEXTS = [
    "Hello world",
    "emoji 🙂🚀 and CJK 世界你好",
    "line one\nline two\n\n\nafter blank lines\n",
    "trailing spaces  ",
    "<s><|system|>\nBe nice.\n<|user|>\nHi there\n<|assistant|>\nHello!<|endoftext|>",
    "a<|user|>b<|assistant|><|endoftext|>c</s>",
]


def test_matches_transformers_legacy_llama_tokenizer(merlinite_tokenizer, tmp_path):
    import transformers  # the test oracle (test extra; reading tokenizer.model needs protobuf, also in it)

    merlinite_tokenizer.save(tmp_path)  # tokenizer_config.json says LlamaTokenizer, legacy=True
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 400, 401, 0)
    for text in ORACLE_TEXTS:
        want = hf.encode(text, add_special_tokens=False)
        got = merlinite_tokenizer.encode(text, parse_special=True)
        assert got == want, f"{text!r}: got {ids_str(merlinite_tokenizer, got)}, transformers {want}"
        # The default, specials as text, is transformers' split_special_tokens=True.
        want_text = hf.encode(text, add_special_tokens=False, split_special_tokens=True)
        got_text = merlinite_tokenizer.encode(text)
        assert got_text == want_text, f"{text!r}: got {ids_str(merlinite_tokenizer, got_text)}, transformers {want_text}"
        if not any(t in text for t in merlinite_tokenizer.added_tokens):
            # With added tokens inside, transformers decodes a run's dummy prefix after a special
            # token as a space ("<|user|>\nHi" -> "<|user|> \nHi"); decode() here inverts encode().
            assert merlinite_tokenizer.decode(got) == hf.decode(want), text
    assert hf.encode("Hi")[0] == 1  # add_bos_token round-trips through save()
