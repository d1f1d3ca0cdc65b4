"""PairRM (llm-blender/PairRM): a pairwise ranker on a DeBERTa-v3-large backbone, as a reward source.

Snorkel-Mistral-PairRM-DPO ranks its sampled responses with it. What follows is llm-blender's definition, read in
github.com/yuchenlin/LLM-Blender (this code is our own, written from those facts):

Input (llm_blender/blender/blender_utils.py `tokenize_pair`; llm_blender/pair_ranker/collator.py
`CrossCompareCollator`; llm_blender/pair_ranker/ranker.py `CrossCompareReranker.cat_ids`). Each part is encoded
as the DeBERTa tokenizer encodes one sequence, [CLS] … [SEP], truncated (content cut, [SEP] kept):

    [CLS] <|source|> source… [SEP] [CLS] <|candidate1|> cand1… [SEP] [CLS] <|candidate2|> cand2… [SEP]

the source part to at most source_max_length = 1224 tokens, each candidate part to
(max_length − len(source part)) // 2 tokens, max_length = 1224 + 2·412 = 2048. (The collator's form —
412 + (1224 − longest source)//2 — is the same number for one source.) The collator also replaces the text
"[SEP]" inside source and candidates by a space; so do we.

Special tokens: llm-blender adds "<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>" to
microsoft/deberta-v3-large's tokenizer (128000 spm pieces + [MASK] = 128000), so they get ids 128001..128004, and
resizes the embeddings to 128005 rows (pairrm_to_hf.ipynb). ([CLS] = 1, [SEP] = 2, [PAD] = 0 in spm.model.)
deberta-v3-large publishes spm.model and a tokenizer_config.json of {"do_lower_case": false, "vocab_type": "spm"}
only: no file names [MASK]; transformers' DebertaV2Tokenizer appends its mask token after the pieces.

Ids (`_prefix_ids`), each by the first rule that applies, as transformers' DebertaV2Tokenizer + add_tokens give them:
- [MASK]: the id a tokenizer file declares; else its piece id, if spm.model has that piece; else the first id after
  the pieces — only for DeBERTa's tokenizer (tokenizer_config.json absent, or its tokenizer_class, vocab_type and
  mask_token, where given, DebertaV2Tokenizer[Fast], "spm" and "[MASK]") whose files declare no id after the pieces.
- each prefix token: the id a tokenizer file declares (which must equal config.json's, where PairRM-hf names it);
  else config.json's; else the next id (add_tokens, in PREFIX_TOKENS order).
Where these give [MASK] no id, or two tokens one id, or an id comes from transformers' placement (a last rule) and
the ids after the pieces are then not exactly the embedding's remaining rows (PairRM resized it to len(tokenizer)),
it is a CheckpointError asking for llm-blender/PairRM-hf's added_tokens.json: never a guess.

Model (llm_blender/pair_ranker/pairrm.py `DebertaV2PairRM`, ranker.py `CrossCompareReranker`):
`pretrained_model` is a DebertaV2Model; the last hidden state at the <|source|>, <|candidate1|>, <|candidate2|>
tokens gives s, c1, c2 ([H] each);

    head_layer = Sequential(Dropout(0.05), Linear(2H → H), Tanh, Dropout(0.05), Linear(H → n_tasks = 1))
    logit = mean over tasks of head_layer([s; c1]) − head_layer([s; c2])        > 0: candidate 1 is better

State dict: `pretrained_model.<DebertaV2Model keys>`, `head_layer.1.{weight,bias}`, `head_layer.4.{weight,bias}`
(the two Dropouts and the Tanh hold nothing) — the same keys in both published layouts:

- llm-blender/PairRM (what `Blender.loadranker` reads, llm_blender/blender/blender.py, blender_utils.py
  `load_ranker`): model.safetensors (or a pickled pytorch_model.bin) + a config.json that is llm-blender's
  RankerConfig (llm_blender/pair_ranker/config.py: ranker_type "pairranker", model_type "deberta", model_name
  "microsoft/deberta-v3-large", source_maxlength, candidate_maxlength, n_tasks, drop_out, …), not a DeBERTa
  config: the backbone's config is deberta-v3-large's, DEBERTA_V3_LARGE below, with the vocabulary read from the
  embedding matrix. The tokenizer is deberta-v3-large's: put its spm.model (and tokenizer_config.json) beside the
  weights; [MASK] and the four prefix tokens then get transformers' ids (Ids above).
- llm-blender/PairRM-hf (`DebertaV2PairRM.from_pretrained`): a DebertaV2Config config.json with n_tasks, drop_out,
  source_prefix_id, cand1_prefix_id, cand2_prefix_id, cand_prefix_id added, plus the tokenizer files (spm.model,
  added_tokens.json, …). Those ids must agree with the tokenizer (checked).

Ranking N candidates (blender.py `Blender.rank` → ranker.py `_full_predict` → gpt_eval/utils.py
`get_scores_from_cmps`, policy "max_logits"): M[i, j] = logit(candidate i vs j) for all N(N−1) ordered pairs,
M[i, i] = 0, and score_i = mean over j of (M[i, j] − M[j, i]) — the mean is over all N columns, the zero
diagonal included, i.e. Σ_{j≠i}(M[i,j] − M[j,i]) / N.

Where we differ on purpose: llm-blender finds the three positions by searching the ids for the prefix tokens
(so a prefix string inside a text would break it); we know where we put them and read those positions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minalign.checkpoint import CheckpointError, load_weights, open_weights
from minalign.rows import response_texts, sample_prompt
from minalign.tokenizer import Tokenizer, load_tokenizer

__all__ = ["PairRMConfig", "PairRM", "PairRanker", "PairRMReward", "load_pairrm", "pairrm_config_from_dir",
           "build_pair", "aggregate", "PREFIX_TOKENS", "DEBERTA_V3_LARGE"]

SOURCE_PREFIX, CAND1_PREFIX, CAND2_PREFIX, CAND_PREFIX = "<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>"
PREFIX_TOKENS = (SOURCE_PREFIX, CAND1_PREFIX, CAND2_PREFIX, CAND_PREFIX)  # in llm-blender's add_tokens order
MASK_TOKEN = "[MASK]"  # DeBERTa's mask token: not a piece of deberta-v3's spm.model, appended by transformers
SOURCE_MAX_LENGTH, CANDIDATE_MAX_LENGTH = 1224, 412

# microsoft/deberta-v3-large's config.json (the backbone of the llm-blender/PairRM layout, whose own config.json
# is a RankerConfig). Written from that hub file; vocab_size is replaced by the checkpoint's embedding rows.
DEBERTA_V3_LARGE = {
    "model_type": "deberta-v2", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
    "intermediate_size": 4096, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512, "type_vocab_size": 0, "initializer_range": 0.02, "layer_norm_eps": 1e-7,
    "relative_attention": True, "max_relative_positions": -1, "position_buckets": 256, "norm_rel_ebd": "layer_norm",
    "share_att_key": True, "pos_att_type": "p2c|c2p", "position_biased_input": False, "pad_token_id": 0,
    "vocab_size": 128100,
}
EMBEDDING_KEY = "pretrained_model.embeddings.word_embeddings.weight"


@dataclass
class PairRMConfig:
    """The backbone's config (a minalign.deberta.DebertaConfig) and what PairRM adds to it."""

    backbone: object
    n_tasks: int = 1
    drop_out: float = 0.05
    source_prefix_id: int = 128001
    cand1_prefix_id: int = 128002
    cand2_prefix_id: int = 128003
    cand_prefix_id: int = 128004
    source_max_length: int = SOURCE_MAX_LENGTH
    candidate_max_length: int = CANDIDATE_MAX_LENGTH

    @property
    def max_length(self) -> int:
        return self.source_max_length + 2 * self.candidate_max_length


class PairRM(nn.Module):
    """Backbone + head; parameter names are the published ones (`pretrained_model.*`, `head_layer.{1,4}.*`).

    backbone: any module mapping (input_ids [B, T], attention_mask [B, T]) to the last hidden state [B, T, H];
    None builds minalign's DebertaModel from cfg.backbone.
    """

    def __init__(self, cfg: PairRMConfig, backbone: nn.Module | None = None, hidden_size: int | None = None):
        super().__init__()
        self.config = cfg
        if backbone is None:
            from minalign.deberta import DebertaModel  # written beside this module; imported when needed
            backbone = DebertaModel(cfg.backbone)
        self.pretrained_model = backbone
        h = hidden_size if hidden_size is not None else cfg.backbone.hidden_size
        self.head_layer = nn.Sequential(nn.Dropout(cfg.drop_out), nn.Linear(2 * h, h), nn.Tanh(),
                                        nn.Dropout(cfg.drop_out), nn.Linear(h, cfg.n_tasks))

    def head(self, source: torch.Tensor, cand1: torch.Tensor, cand2: torch.Tensor) -> torch.Tensor:
        """Logits [B] from the three prefix tokens' hidden states [B, H]: > 0 means candidate 1 is better."""
        left = self.head_layer(torch.cat([source, cand1], dim=-1))
        right = self.head_layer(torch.cat([source, cand2], dim=-1))
        return (left - right).float().mean(dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B] of B pairs; positions [B, 3]: where <|source|>, <|candidate1|>, <|candidate2|> stand."""
        hidden = self.pretrained_model(input_ids, attention_mask)
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        picked = hidden[rows, positions.to(hidden.device)]  # [B, 3, H]
        return self.head(picked[:, 0], picked[:, 1], picked[:, 2])


# ------------------------------------------------------------------------------------------------ input building
@dataclass
class Pair:
    """One model input: ids, and the positions of the three prefix tokens in them."""

    ids: list[int]
    positions: tuple[int, int, int]


def _part(tok: Tokenizer, prefix: str, text: str, limit: int, cls: int, sep: int) -> list[int]:
    """[CLS] prefix text… [SEP], at most limit ids (the text is cut, [SEP] kept) — one DeBERTa sequence."""
    if limit < 3:
        raise ValueError(f"no room for a part of {limit} tokens (need [CLS], the prefix and [SEP])")
    # parse_special: as llm-blender's transformers tokenizer does, added tokens ([MASK]) in a text are tokens; the
    # positions the head reads are where we put the prefixes, so a prefix string in a text cannot move them
    body = tok.encode(prefix + text.replace("[SEP]", " "), parse_special=True)
    return [cls] + body[:limit - 2] + [sep]


def build_pair(tok: Tokenizer, cfg: PairRMConfig, source: str, cand1: str, cand2: str) -> Pair:
    """The input of one comparison, truncated as llm-blender truncates it (see the module doc)."""
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    src = _part(tok, SOURCE_PREFIX, source, cfg.source_max_length, cls, sep)
    room = (cfg.max_length - len(src)) // 2
    c1 = _part(tok, CAND1_PREFIX, cand1, room, cls, sep)
    c2 = _part(tok, CAND2_PREFIX, cand2, room, cls, sep)
    return Pair(src + c1 + c2, (1, len(src) + 1, len(src) + len(c1) + 1))


def collate(pairs: list[Pair], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask [B, longest] (right-padded) and positions [B, 3]."""
    width = max(len(p.ids) for p in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for b, p in enumerate(pairs):
        ids[b, :len(p.ids)] = torch.tensor(p.ids)
        mask[b, :len(p.ids)] = 1
    positions = torch.tensor([p.positions for p in pairs], dtype=torch.long)
    return ids.to(device), mask.to(device), positions.to(device)


def aggregate(matrix: torch.Tensor) -> torch.Tensor:
    """Scores [N] from the comparison matrix [N, N] (M[i, j]: logit of i vs j; the diagonal is ignored):
    score_i = Σ_j (M[i, j] − M[j, i]) / N, llm-blender's "max_logits" policy."""
    m = matrix.float().clone()
    m.fill_diagonal_(0.0)
    return (m - m.T).mean(dim=-1)


# ------------------------------------------------------------------------------------------------ loading
def _deberta_tokenizer(path: Path) -> bool:
    """Whether transformers reads path's tokenizer as DebertaV2Tokenizer with mask token [MASK] (see the module doc)."""
    config = path / "tokenizer_config.json"
    raw = json.loads(config.read_text()) if config.is_file() else {}  # load_tokenizer has checked the JSON
    mask = raw.get("mask_token", MASK_TOKEN)
    return (raw.get("tokenizer_class") in (None, "DebertaV2Tokenizer", "DebertaV2TokenizerFast")
            and raw.get("vocab_type", "spm") == "spm"
            and (mask.get("content") if isinstance(mask, dict) else mask) == MASK_TOKEN)


def _prefix_ids(tok: Tokenizer, cfg_ids: dict[str, int] | None, rows: int, where: Path | str,
                deberta: bool = True) -> Tokenizer:
    """The tokenizer with [MASK] and the four prefix tokens at transformers' ids (DebertaV2Tokenizer, then llm-blender's
    add_tokens), by the rules of the module doc; rows: the embedding's; deberta: _deberta_tokenizer of the dir."""
    fix = f"copy added_tokens.json of llm-blender/PairRM-hf into {where} (or one naming these ids)"
    added = dict(tok.added_tokens)
    placed = []  # tokens whose id is transformers' placement rather than a file's, a piece's or config.json's
    if MASK_TOKEN not in added:
        piece = tok.sp.piece_to_id(MASK_TOKEN)
        if tok.sp.id_to_piece(piece) == MASK_TOKEN:
            added[MASK_TOKEN] = piece  # added too, so "[MASK]" in a text is one token, as in transformers
        elif deberta and max(added.values(), default=-1) < tok.sp_size:
            added[MASK_TOKEN] = tok.sp_size
            placed.append(MASK_TOKEN)
        else:
            # transformers appends it after whatever the files declare, where len(tokenizer) and the declared ids may
            # disagree (and another tokenizer class has its own rule): its row cannot be told from these files
            why = "tokenizer_config.json is not DeBERTa's" if not deberta else "the files declare ids after the pieces"
            raise CheckpointError(f"{where}: no file gives [MASK] an id, it is no piece of the sentencepiece model, "
                                  f"and {why}: {fix}")
    for token in PREFIX_TOKENS:
        want = cfg_ids[token] if cfg_ids else None
        if token in added:
            if want is not None and added[token] != want:
                raise CheckpointError(f"{where}: the tokenizer gives {token} id {added[token]}, config.json {want}")
        elif want is not None:
            added[token] = want
        else:
            added[token] = max(tok.sp_size - 1, *added.values()) + 1
            placed.append(token)
    special = {c for c in added if tok.is_special(c)} | {MASK_TOKEN}
    try:
        out = Tokenizer(tok.sp, added_tokens=added, special_tokens=special, roles=tok.roles,
                        add_bos_token=tok.add_bos_token, add_eos_token=tok.add_eos_token)
    except ValueError as e:  # two tokens on one id, or an id on a piece of another name
        raise CheckpointError(f"{where}: {e}: {fix}") from None
    ids = sorted(added[t] for t in (MASK_TOKEN, *PREFIX_TOKENS))
    if ids[-1] >= rows:
        raise CheckpointError(f"{where}: [MASK] and prefix token ids {ids} do not fit the {rows}-row embedding")
    beyond = sorted(i for i in added.values() if i >= tok.sp_size)
    if placed and beyond != list(range(tok.sp_size, rows)):
        raise CheckpointError(f"{where}: by transformers' rule {', '.join(placed)} get ids "
                              f"{[added[t] for t in placed]}, so the ids after the {tok.sp_size} pieces are {beyond}, "
                              f"not {tok.sp_size}..{rows - 1} as the checkpoint's {rows}-row embedding has: {fix}")
    return out


def _embedding_rows(path: Path) -> int:
    found = open_weights(path)  # the headers, checked against their files (a corrupt one named)
    if EMBEDDING_KEY in found:
        return int(found[EMBEDDING_KEY].shape[0])
    raise CheckpointError(f"{path}: the weights have no {EMBEDDING_KEY} (is this a PairRM checkpoint?)")


def pairrm_config_from_dir(path) -> tuple[PairRMConfig, dict[str, int] | None]:
    """The config of a PairRM dir (either published layout), and the prefix ids its config.json names (None for
    the llm-blender layout, whose ids come from the tokenizer)."""
    from minalign.deberta import deberta_config_from_hf

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a PairRM checkpoint dir with config.json)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: config.json is missing")
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'}: malformed JSON: {e}") from None
    if "ranker_type" in raw:  # llm-blender/PairRM: a RankerConfig
        if raw["ranker_type"] != "pairranker" or not str(raw.get("model_type", "")).startswith("deberta"):
            raise CheckpointError(f"{path}: a ranker of type {raw['ranker_type']!r}/{raw.get('model_type')!r}; "
                                  f"only llm-blender's 'pairranker' on DeBERTa is supported")
        if not str(raw.get("model_name", "")).endswith("deberta-v3-large"):
            raise CheckpointError(f"{path}: backbone {raw.get('model_name')!r}; only microsoft/deberta-v3-large's "
                                  f"config is known here")
        backbone = deberta_config_from_hf({**DEBERTA_V3_LARGE, "vocab_size": _embedding_rows(path)})
        cfg = PairRMConfig(backbone, n_tasks=int(raw.get("n_tasks") or 1), drop_out=float(raw.get("drop_out", 0.05)),
                           source_max_length=int(raw.get("source_maxlength") or SOURCE_MAX_LENGTH),
                           candidate_max_length=int(raw.get("candidate_maxlength") or CANDIDATE_MAX_LENGTH))
        return cfg, None
    needed = ("n_tasks", "source_prefix_id", "cand1_prefix_id", "cand2_prefix_id", "cand_prefix_id")
    absent = [k for k in needed if k not in raw]
    if absent:
        raise CheckpointError(f"{path / 'config.json'}: neither llm-blender's RankerConfig (no ranker_type) nor a "
                              f"DebertaV2PairRM config (lacks {', '.join(absent)})")
    cfg = PairRMConfig(deberta_config_from_hf(raw), n_tasks=int(raw["n_tasks"]),
                       drop_out=float(raw.get("drop_out", 0.05)), source_prefix_id=int(raw["source_prefix_id"]),
                       cand1_prefix_id=int(raw["cand1_prefix_id"]), cand2_prefix_id=int(raw["cand2_prefix_id"]),
                       cand_prefix_id=int(raw["cand_prefix_id"]))
    ids = dict(zip(PREFIX_TOKENS, (cfg.source_prefix_id, cfg.cand1_prefix_id, cfg.cand2_prefix_id, cfg.cand_prefix_id)))
    return cfg, ids


def load_pairrm(path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> PairRanker:
    """A PairRM checkpoint dir (llm-blender/PairRM or llm-blender/PairRM-hf layout, safetensors) as a PairRanker.

    dtype None keeps the stored dtype. CheckpointError names the file or lists the missing/unexpected/mis-shaped
    keys; pickled weights are refused (convert them to safetensors first)."""
    path = Path(path)
    cfg, cfg_ids = pairrm_config_from_dir(path)
    try:
        tok = load_tokenizer(path)
    except FileNotFoundError as e:
        raise CheckpointError(f"{e}. The llm-blender/PairRM repo ships no tokenizer: copy spm.model and "
                              f"tokenizer_config.json of microsoft/deberta-v3-large into {path}") from None
    tok = _prefix_ids(tok, cfg_ids, cfg.backbone.vocab_size, path, _deberta_tokenizer(path))
    cfg.source_prefix_id, cfg.cand1_prefix_id, cfg.cand2_prefix_id, cfg.cand_prefix_id = (
        tok.added_tokens[t] for t in PREFIX_TOKENS)

    with torch.device("meta"):
        model = PairRM(cfg)
    what = f"a PairRM of {cfg.backbone.num_hidden_layers} layers, hidden size {cfg.backbone.hidden_size}"
    load_weights(model, path, what, dtype, device)  # refuses pickles; lists every key at fault
    return PairRanker(model.eval(), tok)


# ------------------------------------------------------------------------------------------------ ranking
class PairRanker:
    """A PairRM model with its tokenizer: compare two candidates, rank N, pick the best of N."""

    def __init__(self, model: PairRM, tokenizer: Tokenizer, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.config = model.config
        self.pad_id = tokenizer.token_to_id("[PAD]")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def compare_many(self, triples: list[tuple[str, str, str]]) -> list[float]:
        """Logit of each (source, candidate 1, candidate 2): > 0 means candidate 1 is better. Batched by
        batch_size pairs, longest first (little padding)."""
        pairs = [build_pair(self.tokenizer, self.config, *t) for t in triples]
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i].ids))
        out = [0.0] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            logits = self.model(*collate([pairs[i] for i in batch], self.pad_id, self.device))
            for i, v in zip(batch, logits.float().cpu().tolist()):
                out[i] = v
        return out

    def compare(self, source: str, cand_a: str, cand_b: str) -> float:
        """The logit of a against b: > 0 means a is better."""
        return self.compare_many([(source, cand_a, cand_b)])[0]

    def rank_many(self, sources: list[str], candidate_lists: list[list[str]]) -> list[list[float]]:
        """Scores of each source's candidates from all N(N−1) ordered pairs (batched across sources); higher is
        better. One candidate scores 0."""
        triples, where = [], []
        for k, (src, cands) in enumerate(zip(sources, candidate_lists, strict=True)):
            for i in range(len(cands)):
                for j in range(len(cands)):
                    if i != j:
                        triples.append((src, cands[i], cands[j]))
                        where.append((k, i, j))
        logits = self.compare_many(triples)
        mats = [torch.zeros(len(c), len(c)) for c in candidate_lists]
        for (k, i, j), v in zip(where, logits):
            mats[k][i, j] = v
        return [aggregate(m).tolist() for m in mats]

    def rank(self, source: str, candidates: list[str]) -> list[float]:
        """Scores of candidates (higher is better): see aggregate."""
        return self.rank_many([source], [candidates])[0]

    def best_of_n(self, source: str, candidates: list[str]) -> tuple[int, list[float]]:
        """Index of the best candidate (the first on a tie) and all scores."""
        scores = self.rank(source, candidates)
        return max(range(len(scores)), key=lambda i: (scores[i], -i)), scores


# ------------------------------------------------------------------------------------------------ reward source
def prompt_text(row: dict) -> str:
    """The source text of a samples row: a string prompt as it is; a messages list, one message its content,
    longer ones as "ROLE: content" lines (llm-blender's conversation form uses "USER:" lines)."""
    messages = sample_prompt(row)
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages)


class PairRMReward:
    """Reward source (minalign.rewards' interface): each response's PairRM score against the other responses of
    its prompt (aggregate's score_i; higher is better). Reads row["prompt"] and the responses' "text"."""

    def __init__(self, path, *, batch_size: int = 16, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu"):
        self.ranker = load_pairrm(path, dtype=dtype, device=device)
        self.ranker.batch_size = batch_size

    def __call__(self, rows: list[dict]) -> list[list[float]]:
        sources, cands = [], []
        for k, row in enumerate(rows):
            try:
                sources.append(prompt_text(row))
                cands.append(response_texts(row))
            except ValueError as e:
                raise ValueError(f"row {k}: {e}") from None
        return self.ranker.rank_many(sources, cands)
