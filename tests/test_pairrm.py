"""PairRM: head and aggregation by hand, input building and truncation, checkpoint layouts, reward source."""
import io
import json
import math
import random
import re

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import save_file
from torch import nn

from minalign import pairrm
from minalign.checkpoint import CheckpointError
from minalign.pairrm import (PREFIX_TOKENS, PairRanker, PairRM, PairRMConfig, PairRMReward, aggregate, build_pair,
                             load_pairrm)
from minalign.rewards import from_spec
from minalign.tokenizer import load_tokenizer

SP_SIZE = 300
WORDS = "the cat dog sat on a mat hello world good bad answer question why how what is fine thanks".split()


def train_spm(user_defined_symbols=()) -> bytes:
    """A DeBERTa-v3-like spm model: [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3 as control pieces, SP_SIZE pieces in all."""
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(500)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, model_type="unigram",
                                   vocab_size=SP_SIZE, byte_fallback=True, character_coverage=1.0,
                                   pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]",
                                   eos_piece="[SEP]", unk_piece="[UNK]", minloglevel=2,
                                   user_defined_symbols=list(user_defined_symbols))
    return buf.getvalue()


@pytest.fixture(scope="module")
def sp_models():
    """"plain": no [MASK] piece, as deberta-v3's spm.model; "mask-piece": [MASK] is piece 4."""
    return {"plain": train_spm(), "mask-piece": train_spm(["[MASK]"])}


# microsoft/deberta-v3-large's tokenizer_config.json, the whole file; that repo has no added_tokens.json and no
# special_tokens_map.json, so transformers appends [MASK] after the spm pieces.
DEBERTA_V3_TOKENIZER_CONFIG = {"do_lower_case": False, "vocab_type": "spm"}


@pytest.fixture(scope="module")
def deberta_tok_dir(tmp_path_factory, sp_models):
    """The files the README has the llm-blender/PairRM layout copy from deberta-v3-large: spm.model (SP_SIZE pieces,
    no [MASK]) and tokenizer_config.json — nothing that names [MASK]."""
    d = tmp_path_factory.mktemp("deberta_tok")
    (d / "spm.model").write_bytes(sp_models["plain"])
    (d / "tokenizer_config.json").write_text(json.dumps(DEBERTA_V3_TOKENIZER_CONFIG))
    return d


@pytest.fixture(scope="module")
def tok(deberta_tok_dir):
    return pairrm._prefix_ids(load_tokenizer(deberta_tok_dir), None, SP_SIZE + 5, deberta_tok_dir)


class PositionBackbone(nn.Module):
    """Stub: the hidden state of token t is [ids[t]] (H = 1), so the head's inputs are the ids it reads; counts
    the pairs it sees."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, input_ids, attention_mask):
        self.seen += input_ids.shape[0]
        return input_ids.float()[..., None]


def hand_head(model):
    """head_layer: h = tanh(0·s + 0.5·c), out = 2·h + 0.3 — so logit = 2(tanh(c1/2) − tanh(c2/2))."""
    with torch.no_grad():
        model.head_layer[1].weight.copy_(torch.tensor([[0.0, 0.5]]))
        model.head_layer[1].bias.zero_()
        model.head_layer[4].weight.copy_(torch.tensor([[2.0]]))
        model.head_layer[4].bias.fill_(0.3)
    return model.eval()


def stub_model(**kw):
    cfg = PairRMConfig(backbone=None, source_prefix_id=SP_SIZE + 1, cand1_prefix_id=SP_SIZE + 2,
                       cand2_prefix_id=SP_SIZE + 3, cand_prefix_id=SP_SIZE + 4, **kw)
    return hand_head(PairRM(cfg, backbone=PositionBackbone(), hidden_size=1))


def test_head_by_hand_and_positions():
    model = stub_model()
    ids = torch.tensor([[7, 1, 9, 3, 2, 5, 4], [0, 2, 0, 6, 0, 1, 0]])
    positions = torch.tensor([[0, 1, 3], [1, 3, 5]])
    got = model(ids, torch.ones_like(ids), positions)
    want = [2 * (math.tanh(1 / 2) - math.tanh(3 / 2)), 2 * (math.tanh(6 / 2) - math.tanh(1 / 2))]
    torch.testing.assert_close(got, torch.tensor(want))
    # the source only enters through a zero weight here; swap the candidates and the logit flips
    got_swapped = model(ids, torch.ones_like(ids), positions[:, [0, 2, 1]])
    torch.testing.assert_close(got_swapped, -got)


def test_aggregate_by_hand():
    m = torch.tensor([[9.0, 1.0, 2.0], [-1.0, 9.0, 3.0], [0.5, 0.0, 9.0]])  # the diagonal is ignored
    torch.testing.assert_close(aggregate(m), torch.tensor([3.5 / 3, 1.0 / 3, -4.5 / 3]))


def test_build_pair_layout_and_prefix_positions(tok):
    cfg = PairRMConfig(backbone=None)
    p = build_pair(tok, cfg, "hello world", "good answer", "bad")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    src = [cls] + tok.encode("<|source|>hello world", parse_special=True) + [sep]
    c1 = [cls] + tok.encode("<|candidate1|>good answer", parse_special=True) + [sep]
    c2 = [cls] + tok.encode("<|candidate2|>bad", parse_special=True) + [sep]
    assert p.ids == src + c1 + c2
    assert [p.ids[i] for i in p.positions] == [tok.added_tokens[t] for t in PREFIX_TOKENS[:3]]
    assert tok.added_tokens["<|source|>"] == SP_SIZE + 1  # after [MASK], in llm-blender's add_tokens order
    # "[SEP]" in a text becomes a space (llm-blender's collator)
    assert build_pair(tok, cfg, "hello[SEP]world", "good", "bad").ids == build_pair(tok, cfg, "hello world", "good",
                                                                                    "bad").ids


@pytest.mark.parametrize("src_words", [3, 200])
def test_truncation_lengths(tok, src_words):
    cfg = PairRMConfig(backbone=None, source_max_length=20, candidate_max_length=8)  # max_length 36
    source = " ".join(["question"] * src_words)
    long = " ".join(["answer"] * 100)
    p = build_pair(tok, cfg, source, long, long + " good")
    n_src = min(20, len(tok.encode("<|source|>" + source, parse_special=True)) + 2)
    room = (36 - n_src) // 2
    assert p.positions == (1, n_src + 1, n_src + room + 1)
    assert len(p.ids) == n_src + 2 * room
    sep = tok.token_to_id("[SEP]")
    assert p.ids[n_src - 1] == sep and p.ids[n_src + room - 1] == sep and p.ids[-1] == sep


def test_rank_all_ordered_pairs_and_best_of_n(tok):
    model = stub_model()
    ranker = PairRanker(model, tok, batch_size=4)
    cands = ["good", "bad answer", "fine thanks", "hello"]
    scores = ranker.rank("why", cands)
    assert model.pretrained_model.seen == 12  # N(N−1)
    m = torch.zeros(4, 4)
    for i in range(4):
        for j in range(4):
            if i != j:
                m[i, j] = ranker.compare("why", cands[i], cands[j])
    torch.testing.assert_close(torch.tensor(scores), aggregate(m))
    best, same = ranker.best_of_n("why", cands)
    assert same == scores and best == max(range(4), key=scores.__getitem__)
    assert ranker.rank("why", ["only"]) == [0.0]


# ------------------------------------------------------------------------------------------------ checkpoints
TINY = {"model_type": "deberta-v2", "vocab_size": SP_SIZE + 5, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64, "relative_attention": True,
        "position_buckets": 16, "norm_rel_ebd": "layer_norm", "share_att_key": True, "pos_att_type": "p2c|c2p",
        "position_biased_input": False, "layer_norm_eps": 1e-7, "max_relative_positions": -1, "type_vocab_size": 0,
        "pad_token_id": 0, "hidden_act": "gelu"}


def _random_pairrm(cfg):
    torch.manual_seed(0)
    model = PairRM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def _hf_dir(tmp_path, deberta_tok_dir, model):
    d = tmp_path / "pairrm-hf"
    d.mkdir()
    (d / "spm.model").write_bytes((deberta_tok_dir / "spm.model").read_bytes())
    ids = {t: SP_SIZE + 1 + k for k, t in enumerate(PREFIX_TOKENS)}
    (d / "added_tokens.json").write_text(json.dumps({"[MASK]": SP_SIZE, **ids}))
    (d / "config.json").write_text(json.dumps({**TINY, "n_tasks": 1, "drop_out": 0.05,
                                               "source_prefix_id": SP_SIZE + 1, "cand1_prefix_id": SP_SIZE + 2,
                                               "cand2_prefix_id": SP_SIZE + 3, "cand_prefix_id": SP_SIZE + 4}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, d / "model.safetensors")
    return d


@pytest.fixture
def tiny_cfg():
    from minalign.deberta import deberta_config_from_hf
    return PairRMConfig(deberta_config_from_hf(TINY))


def test_published_keys(tiny_cfg):
    keys = set(PairRM(tiny_cfg).state_dict())
    assert {"head_layer.1.weight", "head_layer.1.bias", "head_layer.4.weight", "head_layer.4.bias",
            "pretrained_model.embeddings.word_embeddings.weight"} <= keys
    assert all(k.startswith(("pretrained_model.", "head_layer.")) for k in keys)


def test_load_hf_layout_round_trip(tmp_path, deberta_tok_dir, tiny_cfg):
    model = _random_pairrm(tiny_cfg)
    ranker = load_pairrm(_hf_dir(tmp_path, deberta_tok_dir, model))
    expected = PairRanker(model, ranker.tokenizer).compare("why", "good answer", "bad")
    assert ranker.compare("why", "good answer", "bad") == pytest.approx(expected, abs=1e-5)
    assert ranker.compare("why", "bad", "good answer") != pytest.approx(expected)


def test_load_llm_blender_layout(tmp_path, deberta_tok_dir, tiny_cfg, monkeypatch):
    # llm-blender/PairRM: a RankerConfig config.json and no prefix tokens in the tokenizer; the backbone config is
    # deberta-v3-large's (shrunk here), the vocabulary read from the embedding.
    monkeypatch.setattr(pairrm, "DEBERTA_V3_LARGE", {**TINY, "vocab_size": 999})
    model = _random_pairrm(tiny_cfg)
    d = _hf_dir(tmp_path, deberta_tok_dir, model)
    (d / "added_tokens.json").write_text(json.dumps({"[MASK]": SP_SIZE}))
    (d / "config.json").write_text(json.dumps({"ranker_type": "pairranker", "model_type": "deberta",
                                               "model_name": "microsoft/deberta-v3-large", "source_maxlength": 1224,
                                               "candidate_maxlength": 412, "n_tasks": 1, "drop_out": 0.05}))
    ranker = load_pairrm(d)
    assert ranker.config.backbone.vocab_size == SP_SIZE + 5
    assert ranker.config.source_prefix_id == SP_SIZE + 1 and ranker.config.cand2_prefix_id == SP_SIZE + 3
    expected = PairRanker(model, ranker.tokenizer).compare("why", "good", "bad")
    assert ranker.compare("why", "good", "bad") == pytest.approx(expected, abs=1e-5)


def test_load_errors(tmp_path, deberta_tok_dir, tiny_cfg):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_pairrm(tmp_path / "nope")
    model = _random_pairrm(tiny_cfg)
    d = _hf_dir(tmp_path, deberta_tok_dir, model)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "head_layer.4.bias"}
    state["head.extra"] = torch.zeros(1)
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): head_layer.4.bias[\s\S]*unexpected keys \(1\): "
                                              r"head.extra"):
        load_pairrm(d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="pickled"):
        load_pairrm(d)
    (d / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(CheckpointError, match="lacks n_tasks"):
        load_pairrm(d)
    (d / "spm.model").unlink()
    (d / "config.json").write_text(json.dumps({**TINY, "n_tasks": 1, "source_prefix_id": 1, "cand1_prefix_id": 2,
                                               "cand2_prefix_id": 3, "cand_prefix_id": 4}))
    with pytest.raises(CheckpointError, match="spm.model"):
        load_pairrm(d)


def test_reward_source(tmp_path, deberta_tok_dir, tiny_cfg):
    d = _hf_dir(tmp_path, deberta_tok_dir, _random_pairrm(tiny_cfg))
    source = from_spec(f"pairrm:{d}", batch_size=3)
    assert isinstance(source, PairRMReward)
    rows = [{"id": 0, "prompt": "why", "responses": [{"text": "good"}, {"text": "bad"}, {"text": "fine"}]},
            {"id": 1, "prompt": [{"role": "user", "content": "how"}], "responses": [{"text": "a"}, {"text": "b"}]}]
    got = source(rows)
    assert [len(r) for r in got] == [3, 2]
    assert got[0] == pytest.approx(source.ranker.rank("why", ["good", "bad", "fine"]), abs=1e-5)
    assert got[1] == pytest.approx(source.ranker.rank("how", ["a", "b"]), abs=1e-5)
    assert sum(got[1]) == pytest.approx(0.0, abs=1e-5)  # the scores of a prompt sum to 0
    with pytest.raises(ValueError, match="row 0: responses\\[0\\] needs a \"text\""):
        source([{"prompt": "x", "responses": [{"token_ids": [1]}]}])
    with pytest.raises(ValueError, match="expected 'pairrm:DIR'"):
        from_spec("pairrm:")


# ------------------------------------------------------------------------------- ids and logits against transformers
# transformers' DebertaV2Tokenizer plus llm-blender's add_tokens is the oracle for every id; transformers'
# DebertaV2Model plus the head written out below is the oracle for the logits. Both published layouts, with and without
# the files that name [MASK]; the embedding has as many rows as the oracle tokenizer has ids (PairRM resized it to
# len(tokenizer)).
SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")
HF_ADDED_TOKENS = {"[MASK]": SP_SIZE, **{t: SP_SIZE + 1 + k for k, t in enumerate(PREFIX_TOKENS)}}
# llm-blender/PairRM-hf's other tokenizer files, in the form a transformers 4.x save_pretrained writes them (abridged;
# written from that form, not read from the hub)
HF_TOKENIZER_FILES = {
    "special_tokens_map.json": {"bos_token": "[CLS]", "cls_token": "[CLS]", "eos_token": "[SEP]",
                                "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]",
                                "unk_token": "[UNK]"},
    "tokenizer_config.json": {**DEBERTA_V3_TOKENIZER_CONFIG, "tokenizer_class": "DebertaV2Tokenizer",
                              "mask_token": "[MASK]", "split_by_punct": False},
}
RANKER_CONFIG = {"ranker_type": "pairranker", "model_type": "deberta", "model_name": "microsoft/deberta-v3-large",
                 "source_maxlength": 12, "candidate_maxlength": 6, "n_tasks": 1, "drop_out": 0.05}
LAYOUTS = {  # name: (config.json kind, spm model, tokenizer files beside spm.model and deberta's tokenizer_config.json)
    "PairRM + deberta-v3 files": ("ranker", "plain", {}),  # the README's setup
    "PairRM + deberta-v3 files + [MASK] in added_tokens.json": ("ranker", "plain",
                                                                {"added_tokens.json": {"[MASK]": SP_SIZE}}),
    "PairRM + PairRM-hf's added_tokens.json": ("ranker", "plain", {"added_tokens.json": HF_ADDED_TOKENS}),
    "PairRM + an spm.model with a [MASK] piece": ("ranker", "mask-piece", {}),
    "PairRM-hf": ("hf", "plain", {"added_tokens.json": HF_ADDED_TOKENS, **HF_TOKENIZER_FILES}),
    "PairRM-hf without added_tokens.json": ("hf", "plain", HF_TOKENIZER_FILES),
    "PairRM-hf saved by transformers": ("hf", "plain", "save_pretrained"),
}
# "[MASK]" only where no space touches it: transformers gives a [MASK] declared in added_tokens.json normalized=True
# (a "▁" piece before it after a space) and its own one normalized=False; our tokenizer ignores those flags.
TEXTS = [("why is the cat on the mat", "the cat sat on a mat", "bad answer"),
         ("hello world how is the dog", "fine thanks what is the[MASK]question", "good"),
         ("what is a good answer to why the dog sat on the mat the cat sat", "the dog sat on a mat is fine thanks",
          "the cat[MASK]is the answer")]


def transformers_tokenizer(d):
    """transformers' DeBERTa-v2/v3 tokenizer of dir d, then llm-blender's add_tokens (a no-op for tokens it has)."""
    from transformers import DebertaV2Tokenizer
    tok = DebertaV2Tokenizer.from_pretrained(str(d))
    tok.add_tokens(list(PREFIX_TOKENS))
    return tok


def write_layout(d, kind, rows, prefix_ids=None) -> PairRM:
    """config.json (llm-blender's RankerConfig, or PairRM-hf's DebertaV2Config + prefix ids) and a random
    model.safetensors with `rows` embedding rows; returns the model."""
    from minalign.deberta import deberta_config_from_hf
    backbone = {**TINY, "vocab_size": rows}
    model = _random_pairrm(PairRMConfig(deberta_config_from_hf(backbone)))
    if kind == "ranker":
        config = RANKER_CONFIG
    else:
        names = ("source_prefix_id", "cand1_prefix_id", "cand2_prefix_id", "cand_prefix_id")
        config = {**backbone, "n_tasks": 1, "drop_out": 0.05, **dict(zip(names, prefix_ids))}
    (d / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, d / "model.safetensors")
    return model


def build_layout(root, name, sp_models):
    """(dir, oracle tokenizer, model) of one LAYOUTS entry."""
    kind, sp_name, files = LAYOUTS[name]
    d = root / name.replace(" ", "_")
    d.mkdir()
    (d / "spm.model").write_bytes(sp_models[sp_name])
    (d / "tokenizer_config.json").write_text(json.dumps(DEBERTA_V3_TOKENIZER_CONFIG))
    if files == "save_pretrained":
        transformers_tokenizer(d).save_pretrained(d)  # tokenizer.json + tokenizer_config.json
    else:
        for file, obj in files.items():
            (d / file).write_text(json.dumps(obj))
    oracle = transformers_tokenizer(d)
    model = write_layout(d, kind, len(oracle), [oracle.convert_tokens_to_ids(t) for t in PREFIX_TOKENS])
    return d, oracle, model


def transformers_logit(oracle, model, rows, source, cand1, cand2, source_max, cand_max) -> float:
    """llm-blender's logit (pairrm_to_hf.ipynb `tokenize_pair`, DebertaV2PairRM) from transformers' tokenizer and
    DebertaV2Model with the model's weights, the head written out."""
    from transformers import DebertaV2Config, DebertaV2Model
    state = model.state_dict()
    hf = DebertaV2Model(DebertaV2Config(**{**TINY, "vocab_size": rows})).eval()
    hf.load_state_dict({k.removeprefix("pretrained_model."): v for k, v in state.items()
                        if k.startswith("pretrained_model.")})
    src = oracle.encode(PREFIX_TOKENS[0] + source, max_length=source_max, truncation=True)
    room = (source_max + 2 * cand_max - len(src)) // 2
    ids = (src + oracle.encode(PREFIX_TOKENS[1] + cand1, max_length=room, truncation=True)
           + oracle.encode(PREFIX_TOKENS[2] + cand2, max_length=room, truncation=True))
    with torch.no_grad():
        hidden = hf(torch.tensor([ids])).last_hidden_state[0]
        s, c1, c2 = (hidden[ids.index(oracle.convert_tokens_to_ids(t))] for t in PREFIX_TOKENS[:3])

        def head(a, b):
            h = torch.tanh(torch.cat([a, b]) @ state["head_layer.1.weight"].T + state["head_layer.1.bias"])
            return h @ state["head_layer.4.weight"].T + state["head_layer.4.bias"]
        return (head(s, c1) - head(s, c2)).mean().item()


def test_token_ids_match_transformers(tmp_path, sp_models, monkeypatch):
    """Every special and added token, the config's prefix ids and whole encodings equal transformers' in every
    published layout (collected over all layouts, so one failure shows which layouts differ)."""
    monkeypatch.setattr(pairrm, "DEBERTA_V3_LARGE", {**TINY, "vocab_size": 999})
    got, want = {}, {}
    for name in LAYOUTS:
        d, oracle, _ = build_layout(tmp_path, name, sp_models)
        texts = ["<|source|>why the cat", "the cat[MASK]sat", "<|candidate2|>good [CLS] answer", "hello[MASK]world"]
        want[name] = ({t: oracle.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + PREFIX_TOKENS},
                      [oracle.encode(t) for t in texts])
        try:
            ranker = load_pairrm(d)
            tok, cfg = ranker.tokenizer, ranker.config
            ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + PREFIX_TOKENS}
        except (CheckpointError, KeyError) as e:
            got[name] = repr(e)
            continue
        assert [cfg.source_prefix_id, cfg.cand1_prefix_id, cfg.cand2_prefix_id, cfg.cand_prefix_id] == [
            ids[t] for t in PREFIX_TOKENS]
        got[name] = ids, [[ids["[CLS]"]] + tok.encode(t, parse_special=True) + [ids["[SEP]"]] for t in texts]
    assert got == want
    # the published rule, as the oracle applies it: [MASK] right after the pieces, then add_tokens' order
    assert want["PairRM + deberta-v3 files"][0]["[MASK]"] == SP_SIZE
    assert want["PairRM + deberta-v3 files"][0]["<|candidate|>"] == SP_SIZE + 4
    assert want["PairRM + an spm.model with a [MASK] piece"][0]["<|source|>"] == SP_SIZE


def test_logits_match_transformers(tmp_path, sp_models, monkeypatch):
    """compare_many on a tiny random checkpoint of each published layout equals transformers' tokenizer +
    DebertaV2Model + the head by hand, truncation included (the RankerConfig's limits are 12 and 6)."""
    monkeypatch.setattr(pairrm, "DEBERTA_V3_LARGE", {**TINY, "vocab_size": 999})
    got, want = {}, {}
    for name in LAYOUTS:
        d, oracle, model = build_layout(tmp_path, name, sp_models)
        limits = (12, 6) if LAYOUTS[name][0] == "ranker" else (1224, 412)
        want[name] = [transformers_logit(oracle, model, len(oracle), *t, *limits) for t in TEXTS]
        try:
            got[name] = load_pairrm(d).compare_many(TEXTS)
        except CheckpointError as e:
            got[name] = repr(e)
    wrong = {name: (got[name], want[name]) for name in LAYOUTS if got[name] != pytest.approx(want[name], abs=1e-5)}
    assert not wrong, "\n".join(f"{name}: {g} vs transformers' {w}" for name, (g, w) in wrong.items())


@pytest.mark.parametrize("case", ["embedding rows", "not DeBERTa's tokenizer", "prefixes without [MASK]",
                                  "config ids on [MASK]"])
def test_undeterminable_ids_are_refused(tmp_path, sp_models, monkeypatch, case):
    """Where neither the files nor transformers' rule fix the ids, a CheckpointError names the file to add."""
    monkeypatch.setattr(pairrm, "DEBERTA_V3_LARGE", {**TINY, "vocab_size": 999})
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "spm.model").write_bytes(sp_models["plain"])
    (d / "tokenizer_config.json").write_text(json.dumps(DEBERTA_V3_TOKENIZER_CONFIG))
    if case == "embedding rows":  # transformers' rule gives 305 ids, the embedding has 306 rows
        write_layout(d, "ranker", SP_SIZE + 6)
    elif case == "not DeBERTa's tokenizer":  # where this class would put <mask>/[MASK] is not DeBERTa's rule
        (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "XLMRobertaTokenizer"}))
        write_layout(d, "ranker", SP_SIZE + 5)
    elif case == "prefixes without [MASK]":  # declared tokens after the pieces, and no id for [MASK]
        (d / "added_tokens.json").write_text(json.dumps({t: SP_SIZE + 1 + k for k, t in enumerate(PREFIX_TOKENS)}))
        write_layout(d, "ranker", SP_SIZE + 5)
    else:  # PairRM-hf's config names 300..303, but transformers' tokenizer has [MASK] = 300
        write_layout(d, "hf", SP_SIZE + 4, [SP_SIZE + k for k in range(4)])
    with pytest.raises(CheckpointError, match=re.escape(f"added_tokens.json of llm-blender/PairRM-hf into {d}")):
        load_pairrm(d)
