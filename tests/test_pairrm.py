"""PairRM: head and aggregation by hand, input building and truncation, checkpoint layouts, reward source."""
import io
import json
import math

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


@pytest.fixture(scope="module")
def deberta_tok_dir(tmp_path_factory):
    """A DeBERTa-v3-like tokenizer dir: spm.model with [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3, [MASK] = SP_SIZE."""
    import random
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(500)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, model_type="unigram",
                                   vocab_size=SP_SIZE, byte_fallback=True, character_coverage=1.0,
                                   pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]",
                                   eos_piece="[SEP]", unk_piece="[UNK]", minloglevel=2)
    d = tmp_path_factory.mktemp("deberta_tok")
    (d / "spm.model").write_bytes(buf.getvalue())
    (d / "added_tokens.json").write_text(json.dumps({"[MASK]": SP_SIZE}))
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
    src = [cls] + tok.encode("<|source|>hello world") + [sep]
    c1 = [cls] + tok.encode("<|candidate1|>good answer") + [sep]
    c2 = [cls] + tok.encode("<|candidate2|>bad") + [sep]
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
    n_src = min(20, len(tok.encode("<|source|>" + source)) + 2)
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
