"""The KV-cache sampler: N samples per prompt, prefilled once, decoded one token a step.

    prompts ─(left-pad, one prefill)─► cache ─(repeat n times)─► decode loop:
        logits ─► logit − logsumexp (the untempered log-prob we record) ─► temperature / top-k / top-p ─► draw
        ─► stop? (stop token, stop string, length) ─► finished rows leave the batch ─► next step

Randomness is per sample: sample j of the prompt with key K draws its uniforms from its own stream seeded by
(seed, K, j), so a prompt's samples do not depend on what else is in the batch, on the batch size, on the
number of ranks or on a resume.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from minalign.config import ModelConfig
from minalign.model import Transformer, attention_mask_4d, token_positions


@dataclass
class Sample:
    """One generated continuation of a prompt."""

    token_ids: list[int]  # generated ids; the stop token (or stop string's tokens) that ended it included
    logprobs: list[float]  # log π(token | prefix) of each generated token, untempered
    finish_reason: str  # "stop" | "length"
    text: str | None = None  # decoded without specials and cut before a stop string (None without a tokenizer)


class KVCache:
    """Preallocated keys/values of every layer: a buffer of `size` slots per row, rolling when windowed.

    The token written at step t lives in slot t % size; `pos[b, s]` is the position it had (−1: empty or
    padding). A query at position p may attend slot s iff 0 ≤ pos ≤ p. A model with a sliding window W gets
    size ≤ W: a wrapped slot is overwritten exactly when its token leaves the window, so the buffer is the window.
    Decoding keeps all its state in tensors and always attends over the whole buffer (masked), so a decode step
    has the same shapes every time: what torch.compile and CUDA graphs need.
    """

    def __init__(self, cfg: ModelConfig, batch: int, size: int, device, dtype: torch.dtype):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, size, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.full((batch, size), -1, device=device, dtype=torch.long)
        self.next_pos = torch.zeros(batch, device=device, dtype=torch.long)  # position of each row's next token
        self.step = torch.zeros(1, device=device, dtype=torch.long)  # steps written so far (a tensor: see above)
        self.size, self.window = size, cfg.sliding_window
        self.mode = "empty"  # -> "prefill" (the prompt, once) -> "decode" (one token a step)

    def prepare(self, tokens: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Positions [B, T] and attention mask for this step; records which slots the step writes."""
        B, T = tokens.shape
        if self.mode == "empty":  # prefill: the prompt attends to itself exactly as without a cache
            self.mode = "prefill"
            positions = token_positions(tokens, attention_mask).expand(B, T)
            real = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            kept = min(T, self.size)  # a rolling buffer keeps only the last `size` steps of a long prompt
            self.slots = torch.arange(T - kept, T, device=tokens.device) % self.size
            self.pos[:, self.slots] = torch.where(real, positions, -1)[:, T - kept:]
            self.next_pos.copy_(real.sum(-1))
            self.step.fill_(T)
            return positions, attention_mask_4d(attention_mask, T, self.window, tokens.device)
        assert T == 1, "after the prefill, the cache takes one token per row and step"
        self.mode = "decode"
        self.slots = self.step % self.size  # [1]
        self.pos.index_copy_(1, self.slots, self.next_pos[:, None])
        positions = self.next_pos[:, None].clone()  # [B, 1]
        self.next_pos += 1
        self.step += 1
        # No window test needed: a windowed cache has at most W slots, all written within the last W steps.
        allowed = (self.pos >= 0) & (self.pos <= positions)
        return positions, allowed[:, None, None, :]  # [B, 1, 1, size]: broadcast over heads and the query

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's k/v [B, KV, T, D] into the slots; return what attention should see."""
        kept = len(self.slots)
        self.k[layer].index_copy_(2, self.slots, k[:, :, k.shape[2] - kept:])
        self.v[layer].index_copy_(2, self.slots, v[:, :, v.shape[2] - kept:])
        if self.mode == "prefill":
            return k, v
        return self.k[layer], self.v[layer]

    def select(self, rows: Tensor) -> None:
        """Keep only these rows (in this order): repeats a prefill for n samples, drops finished rows."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.pos, self.next_pos = self.pos[rows], self.next_pos[rows]


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Scores [B, V] with everything outside top-k, then outside the top-p nucleus, set to −inf.

    Nucleus: keep a token iff the probability mass of the tokens ranked above it is < top_p (so the most
    likely token always stays), the rule of transformers' TopPLogitsWarper.
    """
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_above = probs.cumsum(dim=-1) - probs
        remove = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_above >= top_p)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def draw(logits: Tensor, uniforms: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Token ids [B]: argmax when temperature is 0, else inverse-CDF draws from the filtered softmax(logits/T).

    With top-k set, the work happens on the k best scores only (already sorted, so top-p needs no full sort).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores, ids = logits, None
    if top_k and top_k < logits.shape[-1]:
        scores, ids = logits.topk(top_k, dim=-1)  # [B, k], sorted descending; dividing by T keeps the order
    scores = scores / temperature
    if top_p < 1.0:
        scores = filter_logits(scores, top_p=top_p)
    # u ∈ [0, 1) picks the first index whose cumulative probability exceeds u·total, which always has probability
    # > 0 while u·total < total. In float64: a float32 u within 2⁻²⁵ of 1 rounds to 1 and would pick the last
    # index, however unlikely (one draw in ~3·10⁷).
    cdf = scores.softmax(dim=-1).cumsum(dim=-1, dtype=torch.float64)  # [B, k or V]
    value = uniforms.to(torch.float64) * cdf[:, -1]
    choice = torch.searchsorted(cdf, value.unsqueeze(-1), right=True).clamp(max=cdf.shape[-1] - 1)
    return choice.squeeze(-1) if ids is None else ids.gather(-1, choice).squeeze(-1)


def sample_step(logits: Tensor, uniforms: Tensor, temperature: float, top_k: int, top_p: float,
                vocab: int | None = None) -> tuple[Tensor, Tensor]:
    """The sampling work of one decode step: (token ids [B], their untempered log-probs [B]) from logits [B, V].

    vocab: draw only ids below it. Checkpoints pad the embedding past the tokenizer (Merlinite: 32005 ids in
    32008 rows); those rows are never drawn, but the log-probs stay normalised over all rows, as the model is.
    """
    ids = draw(logits[:, :vocab], uniforms, temperature, top_k, top_p)
    # log p(id) = logit(id) − logsumexp(logits): the one number we need, without a [B, V] log_softmax
    return ids, logits.gather(-1, ids[:, None]).squeeze(-1) - logits.logsumexp(dim=-1)


def _stop_string_hit(tokenizer, token_ids: list[int], stop_strings, tail_tokens: int) -> bool:
    """Does the text of the last tail_tokens ids contain a stop string? (Checked every step, so a new stop
    string always lies in the tail; decoding just the tail keeps the check O(1) per token.)"""
    text = tokenizer.decode(token_ids[-tail_tokens:])
    return any(s in text for s in stop_strings)


def _sample_text(tokenizer, token_ids: list[int], stop_strings) -> str:
    """The text of a sample (special tokens skipped), cut before the first stop string."""
    text = tokenizer.decode(token_ids)
    cuts = [text.find(s) for s in stop_strings if s in text]
    return text[:min(cuts)] if cuts else text


def _decode(model: Transformer, token_ids: Tensor, cache: KVCache) -> Tensor:
    """One decode step: next-token logits [B, V] (fp32) for the tokens [B] just chosen."""
    hidden = model(token_ids[:, None], cache=cache, return_hidden=True)
    return model.lm_head(hidden[:, -1]).float()


_COMPILED = {}


def _compiled_decode(device: torch.device):
    """_decode through torch.compile, made once per process and device type (CUDA graphs on GPU)."""
    if device.type not in _COMPILED:
        mode = "reduce-overhead" if device.type == "cuda" else None
        _COMPILED[device.type] = torch.compile(_decode, mode=mode)
    return _COMPILED[device.type]


def _check(model: Transformer, prompts, n, max_new_tokens, temperature, top_k, top_p, stop_strings, tokenizer):
    """ValueError for settings generate cannot honour."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt at least one token")
    if n < 1 or max_new_tokens < 1 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"bad sampling settings: n={n}, max_new_tokens={max_new_tokens}, "
                         f"temperature={temperature}, top_k={top_k}, top_p={top_p}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to read the generated text")
    longest, context = max(map(len, prompts)), model.config.max_position_embeddings
    if longest + max_new_tokens > context:
        raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context "
                         f"of {context}")


def _prefill(model: Transformer, prompts: list[list[int]], n: int, max_new_tokens: int,
             device: torch.device) -> tuple[KVCache, Tensor]:
    """(the KV cache, the next-token logits [B·n, V]) after one forward over the left-padded prompts, so that
    every row's next token goes to the same step; the n samples of a prompt share its prefill (rows b·n ..
    b·n + n − 1 are copies of prompt b)."""
    cfg, B, longest = model.config, len(prompts), max(map(len, prompts))
    tokens = torch.zeros(B, longest, dtype=torch.long)
    mask = torch.zeros(B, longest, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, longest - len(p):] = torch.tensor(p)
        mask[b, longest - len(p):] = 1
    size = longest + max_new_tokens
    if cfg.sliding_window is not None:
        size = min(size, cfg.sliding_window)
    cache = KVCache(cfg, B, size, device, model.lm_head.weight.dtype)
    hidden = model(tokens.to(device), mask.to(device) if mask.eq(0).any() else None, cache=cache, return_hidden=True)
    logits = model.lm_head(hidden[:, -1]).float()  # only the last position is needed: [B, V]
    rows = torch.arange(B, device=device).repeat_interleave(n)
    cache.select(rows)
    return cache, logits[rows]


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_token_ids=(), stop_strings=(),
             tokenizer=None, seed: int = 0, prompt_keys: list[int] | None = None, progress=None,
             compile: bool = False) -> list[list[Sample]]:
    """n samples for each prompt (lists of token ids): one inner list of Samples per prompt, in prompt order.

    temperature 0 is greedy. top_k 0 and top_p 1 disable those filters. Generation of a sample stops at a
    stop token, at a stop string (needs `tokenizer`; the text is cut before it) or after max_new_tokens.
    With a tokenizer, only ids it knows are drawn (not the checkpoint's padding rows past its vocabulary).
    prompt_keys: an int per prompt that keys its random streams (default: its index in `prompts`).
    progress: called with the number of tokens generated at each step (for a tokens/s display).
    compile: run decode steps through torch.compile (CUDA graphs on GPU). Shapes then stay fixed: finished
    rows stay in the batch (their results are ignored) instead of leaving it.
    """
    _check(model, prompts, n, max_new_tokens, temperature, top_k, top_p, stop_strings, tokenizer)
    if tokenizer is not None:  # a stop string that is an added token ("<|user|>") is that token: stop on its id
        stop_token_ids = [*stop_token_ids, *(tokenizer.added_tokens[s] for s in stop_strings if s in tokenizer.added_tokens)]
        stop_strings = [s for s in stop_strings if s not in tokenizer.added_tokens]
    keys = list(range(len(prompts))) if prompt_keys is None else list(prompt_keys)
    device = model.lm_head.weight.device

    B = len(prompts)
    cache, logits = _prefill(model, prompts, n, max_new_tokens, device)
    rngs = [random.Random(f"{seed}/{keys[r // n]}/{r % n}") for r in range(B * n)]
    out_ids: list[list[int]] = [[] for _ in range(B * n)]
    out_logprobs: list[list[float]] = [[] for _ in range(B * n)]
    finish = ["length"] * (B * n)
    stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
    tail_tokens = 4 * max(map(len, stop_strings), default=0) + 8  # a byte-fallback char can take 4 tokens
    in_batch = list(range(B * n))  # the original row of each batch row
    live = list(range(B * n))  # the batch rows still generating
    decode = _compiled_decode(device) if compile else _decode
    vocab = tokenizer.vocab_size if tokenizer is not None else None

    for step in range(max_new_tokens):
        if len(live) < len(in_batch):  # only the compiled path keeps finished rows in the batch
            logits = logits[torch.tensor(live, device=device)]
        uniforms = torch.tensor([rngs[in_batch[i]].random() for i in live], dtype=torch.float64, device=device)
        next_ids, logprobs = sample_step(logits, uniforms, temperature, top_k, top_p, vocab)
        stopped = torch.isin(next_ids, stop_ids)
        ids_list, lp_list, stopped_list = next_ids.tolist(), logprobs.tolist(), stopped.tolist()
        still = []
        for j, i in enumerate(live):
            r = in_batch[i]
            out_ids[r].append(ids_list[j])
            out_logprobs[r].append(lp_list[j])
            if stopped_list[j] or (stop_strings and _stop_string_hit(tokenizer, out_ids[r], stop_strings, tail_tokens)):
                finish[r] = "stop"
            else:
                still.append(j)
        if progress is not None:
            progress(len(live))
        if not still or step == max_new_tokens - 1:
            break
        if compile:  # fixed shapes: every row gets a token, finished ones a dummy
            feed = torch.zeros(len(in_batch), dtype=torch.long, device=device)
            feed[torch.tensor(live, device=device)] = next_ids
            live = [live[j] for j in still]
        else:  # finished rows leave the batch: no more model or sampling work for them
            feed = next_ids
            if len(still) < len(live):
                index = torch.tensor(still, device=device)
                cache.select(index)
                feed = next_ids[index]
                in_batch = [in_batch[live[j]] for j in still]
            live = list(range(len(in_batch)))
        logits = decode(model, feed, cache)

    samples = []
    for r in range(B * n):
        text = _sample_text(tokenizer, out_ids[r], stop_strings) if tokenizer is not None else None
        samples.append(Sample(out_ids[r], out_logprobs[r], finish[r], text))
    return [samples[b * n:(b + 1) * n] for b in range(B)]
