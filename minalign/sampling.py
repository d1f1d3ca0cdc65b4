"""The KV-cache sampler with continuous batching: N samples per prompt, each prompt prefilled once, `slots` rows
decoded side by side one token a step, a finished row's slot refilled at once.

    queue of (prompt, sample j), longest prompt first
      ─► a free slot takes the next one: its prompt prefilled alone (once for its n samples), copied into the slot
      ─► decode step over every slot [slots, 1]:
           logits ─► logit − logsumexp (the untempered log-prob we record) ─► temperature / top-k / top-p ─► draw
           ─► stop? (stop token, stop string, length) ─► a finished sample frees its slot ─► next step

Randomness is per sample: sample j of the prompt with key K draws its uniforms from its own stream seeded by
(seed, K, j), so a prompt's samples do not depend on what else is decoded beside them, on the number of slots, on
the schedule, on the number of ranks or on a resume: the same token ids everywhere. The log-probs are the same
bits too for a dense model at a given number of slots, since every row is computed in the same shapes whatever
its neighbours (a prompt's prefill runs alone; each decode step is [slots, 1]); Mixtral's experts see a batch
that depends on the neighbours, so there they can differ in the last bits.
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from minalign.config import ModelConfig
from minalign.model import Transformer, attention_mask_4d


@dataclass
class Sample:
    """One generated continuation of a prompt."""

    token_ids: list[int]  # generated ids; the stop token (or stop string's tokens) that ended it included
    logprobs: list[float]  # log π(token | prefix) of each generated token, untempered
    finish_reason: str  # "stop" | "length"
    text: str | None = None  # decoded without specials and cut before a stop string (None without a tokenizer)


class KVCache:
    """Keys/values of `rows` sequences side by side, each with its own write position, in a buffer of `size`
    slots per row that rolls when the model has a sliding window.

    Row r's token at position t lives in slot t % size; `pos[r, s]` is the position of the token in slot s (−1:
    empty), `length[r]` the position of row r's next token. A query at position p may attend slot s iff
    0 ≤ pos ≤ p. A model with a sliding window W gets size ≤ W: a slot is overwritten exactly when its token leaves
    the window, so the buffer is the window. Rows of different ages decode side by side (continuous batching):
    a decode step writes each row at its own slot. A prompt is prefilled alone into a one-row cache (`prefill`)
    and copied into the rows of its samples (`copy_row`), which replaces everything the row held before.
    A decode step keeps all its state in tensors and always attends over the whole buffer (masked), so it has
    the same shapes every time: what torch.compile and CUDA graphs need.
    """

    def __init__(self, cfg: ModelConfig, rows: int, size: int, device, dtype: torch.dtype):
        shape = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, size, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.full((rows, size), -1, device=device, dtype=torch.long)
        self.length = torch.zeros(rows, device=device, dtype=torch.long)
        self.rows = torch.arange(rows, device=device)
        self.size, self.window = size, cfg.sliding_window
        self.prefilling = False

    def prefill(self, model: Transformer, prompt: list[int]) -> Tensor:
        """Run the prompt through the model into row 0 (a one-row cache); return its next-token logits [V]."""
        self.prefilling = True
        tokens = torch.tensor([prompt], device=self.k.device)
        hidden = model(tokens, cache=self, return_hidden=True)  # [1, T, H]
        self.prefilling = False
        return model.lm_head(hidden[0, -1]).float()  # only the last position is needed

    def prepare(self, tokens: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Positions [B, T] and attention mask for this step; records which slots the step writes."""
        B, T = tokens.shape
        if self.prefilling:  # one prompt [1, T], unpadded: it attends to itself exactly as without a cache
            assert B == 1 and attention_mask is None
            positions = torch.arange(T, device=tokens.device)[None]
            kept = min(T, self.size)  # a rolling buffer keeps only the last `size` tokens of a long prompt
            self.slots = torch.arange(T - kept, T, device=tokens.device) % self.size
            self.pos[0] = -1
            self.pos[0, self.slots] = torch.arange(T - kept, T, device=tokens.device)
            self.length[0] = T
            return positions, attention_mask_4d(None, T, self.window, tokens.device)
        assert T == 1 and B == len(self.rows), "a decode step takes one token for every row"
        self.slots = self.length % self.size  # [B]: each row writes at its own slot
        self.pos[self.rows, self.slots] = self.length
        positions = self.length[:, None].clone()  # [B, 1]
        self.length += 1
        # No window test needed: a windowed cache has at most W slots, all written within the row's last W steps.
        allowed = (self.pos >= 0) & (self.pos <= positions)
        return positions, allowed[:, None, None, :]  # [B, 1, 1, size]: broadcast over heads and the query

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's k/v [B, KV, T, D] into the slots; return what attention should see."""
        if self.prefilling:
            kept = len(self.slots)
            self.k[layer, 0].index_copy_(1, self.slots, k[0, :, k.shape[2] - kept:])
            self.v[layer, 0].index_copy_(1, self.slots, v[0, :, v.shape[2] - kept:])
            return k, v
        self.k[layer][self.rows, :, self.slots] = k[:, :, 0]  # [B, KV, D] at (row, slot)
        self.v[layer][self.rows, :, self.slots] = v[:, :, 0]
        return self.k[layer], self.v[layer]

    def copy_row(self, row: int, source: KVCache) -> None:
        """Row `row` becomes a copy of the one-row cache `source` (a prefilled prompt): nothing of what the row
        held before stays visible, since pos and length are replaced with the keys."""
        self.k[:, row], self.v[:, row] = source.k[:, 0], source.v[:, 0]
        self.pos[row], self.length[row] = source.pos[0], source.length[0]


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


SCHEDULES = ("continuous", "static")


def cache_size(config: ModelConfig, longest_prompt: int, max_new_tokens: int) -> int:
    """Slots per row of the KV cache: the longest prompt plus max_new_tokens, or the sliding window if smaller."""
    size = longest_prompt + max_new_tokens
    return size if config.sliding_window is None else min(size, config.sliding_window)


@torch.no_grad()
def stream(model: Transformer, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_token_ids=(), stop_strings=(),
           tokenizer=None, seed: int = 0, prompt_keys: list[int] | None = None, slots: int | None = None,
           schedule: str = "continuous", progress=None, compile: bool = False,
           longest_prompt: int | None = None) -> Iterator[tuple[int, list[Sample]]]:
    """(index of a prompt, its n Samples) for every prompt, each as soon as its last sample has finished.

    Continuous batching: `slots` rows decode side by side (default: every sample at once). The samples wait in a
    queue, longest prompt first; when a row finishes, the next waiting sample takes its slot before the next step,
    its prompt prefilled alone (the n samples of a prompt share that prefill: each slot gets a copy of it). Every
    decode step has the same shape [slots, 1], a free slot decoding a dummy token. schedule "static" admits
    samples only when every slot is free: a batch of `slots` samples at a time, as a batched sampler does.
    The settings are generate's; progress(tokens) is called after every step (a token per slot in use).
    longest_prompt: size the cache for it (default: the longest here; a job split over ranks passes its own).
    """
    _check(model, prompts, n, max_new_tokens, temperature, top_k, top_p, stop_strings, tokenizer)
    if schedule not in SCHEDULES or (slots is not None and slots < 1):
        raise ValueError(f"bad schedule {schedule!r} or slots {slots!r}: a schedule of {SCHEDULES}, slots >= 1")
    if tokenizer is not None:  # a stop string that is an added token ("<|user|>") is that token: stop on its id
        stop_token_ids = [*stop_token_ids, *(tokenizer.added_tokens[s] for s in stop_strings if s in tokenizer.added_tokens)]
        stop_strings = [s for s in stop_strings if s not in tokenizer.added_tokens]
    keys = list(range(len(prompts))) if prompt_keys is None else list(prompt_keys)
    device, dtype, S = model.lm_head.weight.device, model.lm_head.weight.dtype, slots or len(prompts) * n
    size = cache_size(model.config, max(longest_prompt or 0, *map(len, prompts)), max_new_tokens)
    cache, stash = KVCache(model.config, S, size, device, dtype), KVCache(model.config, 1, size, device, dtype)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first, then input order
    queue = deque((p, j) for p in order for j in range(n))  # (prompt, sample) waiting for a slot
    occupant: list[tuple[int, int] | None] = [None] * S  # the sample in each slot
    logits = torch.zeros(S, model.config.vocab_size, device=device)  # each slot's next-token logits
    ids, logprobs = [[[] for _ in range(n)] for _ in prompts], [[[] for _ in range(n)] for _ in prompts]
    finish = [["length"] * n for _ in prompts]
    left, rngs, stashed = [n] * len(prompts), {}, None
    stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
    tail_tokens = 4 * max(map(len, stop_strings), default=0) + 8  # a byte-fallback char can take 4 tokens
    decode, vocab = _compiled_decode(device) if compile else _decode, getattr(tokenizer, "vocab_size", None)

    while True:
        free = [s for s in range(S) if occupant[s] is None]
        if queue and (schedule == "continuous" or len(free) == S):
            for s in free[:len(queue)]:  # admit: the next waiting samples take the free slots
                p, j = queue.popleft()
                if stashed != p:  # the samples of a prompt are queued together: one prefill serves them all
                    stash_logits, stashed = stash.prefill(model, prompts[p]), p
                cache.copy_row(s, stash)
                logits[s] = stash_logits
                occupant[s], rngs[p, j] = (p, j), random.Random(f"{seed}/{keys[p]}/{j}")
        live = [s for s in range(S) if occupant[s] is not None]
        if not live:
            return
        full = len(live) == S  # every slot busy (the usual case): no gathering of rows
        rows = None if full else torch.tensor(live, device=device)
        uniforms = torch.tensor([rngs[occupant[s]].random() for s in live], dtype=torch.float64, device=device)
        next_ids, next_logprobs = sample_step(logits if full else logits[rows], uniforms, temperature, top_k, top_p,
                                              vocab)
        # One copy to the host a step, the only sync the scheduler needs (which slots finished): the tokens, their
        # log-probs and the stop flags together, in float64 (exact for token ids and for fp32 log-probs).
        host = torch.stack([next_ids.double(), next_logprobs.double(), torch.isin(next_ids, stop_ids).double()])
        finished = []
        for s, token, lp, stopped in zip(live, *host.tolist()):
            p, j = occupant[s]
            ids[p][j].append(int(token))
            logprobs[p][j].append(lp)
            if stopped or (stop_strings and _stop_string_hit(tokenizer, ids[p][j], stop_strings, tail_tokens)):
                finish[p][j] = "stop"
            elif len(ids[p][j]) < max_new_tokens:
                continue
            occupant[s], left[p] = None, left[p] - 1  # the slot is free for the next waiting sample
            if left[p] == 0:
                finished.append(p)
        if progress is not None:
            progress(len(live))  # the tokens of this step: one per slot in use
        for p in finished:
            texts = [_sample_text(tokenizer, t, stop_strings) if tokenizer is not None else None for t in ids[p]]
            yield p, [Sample(ids[p][j], logprobs[p][j], finish[p][j], texts[j]) for j in range(n)]
        if any(o is not None for o in occupant):  # else the next samples start from their prefill
            feed = next_ids
            if not full:  # a free slot decodes a dummy token
                feed = torch.zeros(S, dtype=torch.long, device=device).index_copy_(0, rows, next_ids)
            logits = decode(model, feed, cache)
            if compile:  # CUDA graphs reuse their output buffer on the next replay; admission writes rows of it
                logits = logits.clone()


def generate(model: Transformer, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_token_ids=(), stop_strings=(),
             tokenizer=None, seed: int = 0, prompt_keys: list[int] | None = None, slots: int | None = None,
             schedule: str = "continuous", progress=None, compile: bool = False) -> list[list[Sample]]:
    """n samples for each prompt (lists of token ids): one inner list of Samples per prompt, in prompt order.

    temperature 0 is greedy. top_k 0 and top_p 1 disable those filters. Generation of a sample stops at a
    stop token, at a stop string (needs `tokenizer`; the text is cut before it) or after max_new_tokens.
    With a tokenizer, only ids it knows are drawn (not the checkpoint's padding rows past its vocabulary).
    prompt_keys: an int per prompt that keys its random streams (default: its index in `prompts`).
    slots, schedule: the rows decoded side by side and how they are refilled (`stream`); the samples' tokens do
    not depend on them. progress: called with the tokens generated (one per slot in use) at each step.
    compile: run decode steps through torch.compile (CUDA graphs on GPU); their shape never changes.
    """
    out: list[list[Sample]] = [[] for _ in prompts]
    for p, samples in stream(model, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, stop_token_ids=stop_token_ids, stop_strings=stop_strings,
                             tokenizer=tokenizer, seed=seed, prompt_keys=prompt_keys, slots=slots,
                             schedule=schedule, progress=progress, compile=compile):
        out[p] = samples
    return out
