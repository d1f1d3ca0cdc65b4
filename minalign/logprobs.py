"""Per-token log-probs of given targets — minalign's common currency (rewards, DPO reference, SFT/DPO losses).

    log p(y_t) = h_t · w_{y_t} − log Σ_v exp(h_t · w_v)          h_t: final hidden state, w_v: lm_head row v

Full logits [T, V] are never held at once: 4k tokens × 32k vocab in fp32 is 512 MB, and its gradient again.
`token_logprobs` picks the implementation — the fused Triton kernel on CUDA, the token-chunked torch path
below elsewhere — so callers never choose. `token_logprobs_reference` is the plain, exact formula for tests.
"""
from __future__ import annotations

import functools
import sys

import torch
from torch import Tensor

from minalign.model import load_balancing_loss

IGNORE_INDEX = -100


def token_logprobs_reference(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """log_softmax(hidden @ weight.T)[t, targets[t]] with full logits (at least fp32); 0 where ignored. For tests."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or float64 when the caller wants it exact
    logits = hidden.to(dtype) @ weight.to(dtype).T  # [T, V]
    keep = targets != ignore_index
    picked = logits.log_softmax(-1).gather(-1, torch.where(keep, targets, 0)[:, None]).squeeze(-1)
    return torch.where(keep, picked, 0.0)


class _ChunkedLogprobs(torch.autograd.Function):
    """The torch path: `chunk` tokens at a time, saving only the log-sum-exp [T] for backward, which recomputes
    each chunk's logits. d log p(y_t) / d logit_v = 1[v = y_t] − softmax_v."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk):
        T = hidden.shape[0]
        out = torch.zeros(T, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros(T, dtype=torch.float32, device=hidden.device)
        keep = targets != ignore_index
        safe_targets = torch.where(keep, targets, 0)
        for s in range(0, T, chunk):
            logits = (hidden[s:s + chunk] @ weight.T).float()  # [chunk, V], the matmul in the inputs' dtype
            lse[s:s + chunk] = logits.logsumexp(-1)
            out[s:s + chunk] = logits.gather(-1, safe_targets[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
        out = torch.where(keep, out, 0.0)
        ctx.save_for_backward(hidden, weight, safe_targets, keep, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, keep, lse = ctx.saved_tensors
        grad_out = torch.where(keep, grad_out.float(), 0.0)  # ignored tokens pass no gradient
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, g = hidden[s:s + ctx.chunk], grad_out[s:s + ctx.chunk]
            # grad_logits = g · (onehot − softmax), built in place in the recomputed logits [chunk, V]
            grad_logits = (h @ weight.T).float().sub_(lse[s:s + ctx.chunk, None]).exp_().mul_(-g[:, None])
            grad_logits.scatter_add_(-1, targets[s:s + ctx.chunk, None], g[:, None])
            if grad_hidden is not None:
                grad_hidden[s:s + ctx.chunk] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, h.float())  # in place: no [V, H] temporary per chunk
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


CHUNK_BYTES = 16 * 2**20  # fp32 logits per chunk: 16 MB is 131 tokens of a 32000-word vocabulary


def token_logprobs_torch(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX,
                         chunk: int | None = None) -> Tensor:
    """log p(targets[t]) [T] fp32 from hidden [T, H] and the lm_head weight [V, H], `chunk` tokens at a time
    (default: as many as keep one chunk's fp32 logits within CHUNK_BYTES)."""
    chunk = chunk or max(16, CHUNK_BYTES // (4 * weight.shape[0]))
    return _ChunkedLogprobs.apply(hidden, weight, targets, ignore_index, chunk)


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """log p(targets[t]) [T] fp32 (0 where targets[t] == ignore_index), differentiable in hidden and weight.

    The fused Triton kernel on CUDA, the token-chunked torch path elsewhere.
    """
    if hidden.shape[-1] != weight.shape[-1] or hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"token_logprobs wants hidden [T, H], weight [V, H], targets [T]; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
    if bad.any():  # the kernel would read past the vocabulary (or return −lse) instead of failing
        raise ValueError(f"targets outside [0, {weight.shape[0]}) that are not ignore_index ({ignore_index}): "
                         f"{targets[bad][:8].tolist()}")
    if hidden.is_cuda and _fused_kernel() is not None:
        return _fused_kernel().token_logprobs(hidden, weight, targets, ignore_index)
    return token_logprobs_torch(hidden, weight, targets, ignore_index)


@functools.cache
def _fused_kernel():
    """kernels.logprob, or None (said once on stderr) where triton is not installed: CUDA builds of torch bring
    it; a CPU install does not need it, so it is not a dependency of minalign."""
    try:
        from kernels import logprob  # imports triton: only where a GPU can run it
    except ImportError as e:
        print(f"minalign: the fused log-prob kernel needs triton ({e}); using the chunked torch path. "
              f"`pip install triton` (or a CUDA build of torch, which ships it) brings the kernel", file=sys.stderr)
        return None
    return logprob


def pack_by_length(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into forwards of at most batch_tokens padded tokens (count × longest; a longer sequence
    goes alone), longest first: little padding, and an out-of-memory error comes at once. The batches depend
    only on the lengths, so the same work cut anew (other ranks, a resume) is computed the same way."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # a batch's first length is its longest
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def sequence_logprobs(model, prompts: list[list[int]], responses: list[list[int]], *,
                      batch_tokens: int = 16384, response_masks: list[list[bool]] | None = None,
                      return_aux_loss: bool = False):
    """(sums [N] fp32, counts [N] int64): Σ_t log π(response_t | prompt, response_<t) and the number of terms.

    Sequences are sorted by length and packed into forwards of at most ~batch_tokens (padded) tokens; only
    the positions that predict a response token go through the lm_head. Results in input order, on the
    model's device; differentiable when grad is enabled.

    response_masks: per response, which of its tokens count (a multi-turn SFT conversation after its first
    reply: the later user turns are context, not targets); None counts every response token.
    return_aux_loss: also return Mixtral's router load-balancing loss (padding excluded), the mean over the
    forwards, as a third value (a zero tensor for a dense model) — for training.
    model may be a wrapper with the Transformer as `.module` (DDP): it is called, its `.module` supplies the
    config and the lm_head weight.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if response_masks is not None and [len(m) for m in response_masks] != [len(r) for r in responses]:
        raise ValueError("response_masks must have one flag per response token")
    core = getattr(model, "module", model)  # DDP keeps the Transformer as .module; FSDP2 shards it in place
    limit = core.config.max_position_embeddings
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not p:
            raise ValueError(f"sequence {i}: an empty prompt (the first response token needs a position before it)")
        if len(p) + len(r) > limit:
            raise ValueError(f"sequence {i}: {len(p)} prompt + {len(r)} response tokens exceed the model's context "
                             f"of {limit}")
    device = core.lm_head.weight.device
    N = len(prompts)
    aux = torch.zeros((), dtype=torch.float32, device=device)
    if N == 0:
        empty = torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long, device=device)
        return (*empty, aux) if return_aux_loss else empty
    sums = torch.zeros(N, dtype=torch.float32, device=device)
    counts = torch.tensor([len(r) if response_masks is None else sum(response_masks[i])
                           for i, r in enumerate(responses)], dtype=torch.long, device=device)
    batches = pack_by_length([len(p) + len(r) for p, r in zip(prompts, responses)], batch_tokens)

    for batch in batches:
        T = max(len(prompts[i]) + len(responses[i]) for i in batch)
        tokens = torch.zeros(len(batch), T, dtype=torch.long)
        targets = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
        for b, i in enumerate(batch):
            seq = prompts[i] + responses[i]
            tokens[b, :len(seq)] = torch.tensor(seq)  # right padding: causal attention never looks ahead
            # position t predicts token t + 1: the response tokens are predicted from len(prompt) − 1 on
            response = torch.tensor(responses[i], dtype=torch.long)
            if response_masks is not None:
                response[~torch.tensor(response_masks[i], dtype=torch.bool)] = IGNORE_INDEX
            targets[b, len(prompts[i]) - 1:len(seq) - 1] = response
        if return_aux_loss:
            hidden, router_logits = model(tokens.to(device), return_hidden=True, return_router_logits=True)
            if router_logits:  # Mixtral: the padding (right of each sequence) takes no part in the balance
                real = (torch.arange(T)[None] < torch.tensor([[len(prompts[i]) + len(responses[i])] for i in batch]))
                aux = aux + load_balancing_loss(router_logits, core.config.num_experts_per_tok,
                                                real.to(device)) / len(batches)
        else:
            hidden = model(tokens.to(device), return_hidden=True)  # [B, T, H]
        targets = targets.to(device)
        picked = targets != IGNORE_INDEX  # [B, T]
        logp = token_logprobs(hidden[picked], core.lm_head.weight, targets[picked])  # [n_response_tokens]
        rows = torch.tensor(batch, device=device)[:, None].expand(len(batch), T)[picked]
        sums = sums.index_add(0, rows, logp)
    return (sums, counts, aux) if return_aux_loss else (sums, counts)
