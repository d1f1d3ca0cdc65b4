"""The token-chunked torch path: log p(targets) without ever holding full logits [T, V], on any device.

    log p(y_t) = h_t · w_{y_t} − lse_t          d log p(y_t) / d logit_v = 1[v = y_t] − softmax_v
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels.reference import IGNORE_INDEX


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
        grad_h, grad_w = logprob_grads(hidden, weight, targets, keep, lse, grad_out, ctx.chunk,
                                       ctx.needs_input_grad[:2])
        return grad_h, grad_w, None, None, None


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with fp32 output and no rounding to the inputs' dtype (what the fused kernel's dots compute): on CUDA
    the tensor cores with fp32 accumulation and output, elsewhere an upcast matmul."""
    if a.is_cuda and a.dtype != torch.float32:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without cuBLAS's fp32-output matmul: the upcast one below
            pass
    return a.float() @ b.float()


def logprob_grads(hidden: Tensor, weight: Tensor, targets: Tensor, keep: Tensor, lse: Tensor | None,
                  grad_out: Tensor, chunk: int, needs: tuple[bool, bool]) -> tuple[Tensor | None, Tensor | None]:
    """(grad_hidden, grad_weight) of Σ_t g_t log p(y_t), `chunk` tokens at a time (targets made safe where not
    kept): grad_logits = g · (onehot − softmax) in the recomputed logits, then two matmuls.

    The backward of both paths (the fused kernel's too). On CUDA the matmuls run in the inputs' dtype on the tensor
    cores (fp32 accumulation inside; ~16× an fp32 matmul), grad_weight summed over chunks in fp32; on the CPU, in
    fp32. Each chunk writes its [chunk, V] logits and one [V, H] product: a few GB at T = 4096 where a kernel that
    atomically adds every (token block, vocabulary tile) into grad_weight moves ~50 GB (docs/benchmarks.md).
    lse: the chunked forward's [T], whose logits (the matmul in the inputs' dtype) are recomputed exactly. None (the
    fused kernel's backward): the logits are recomputed in fp32, unrounded, as the kernel's dots were, and their
    log-sum-exp with them, since a softmax from one summation order and an lse from another disagree where logits
    are large (×100: a 1e-5 relative difference is e^0.001)."""
    grad_out = torch.where(keep, grad_out.float(), 0.0)  # ignored tokens pass no gradient
    grad_hidden = torch.empty_like(hidden) if needs[0] else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs[1] else None
    for s in range(0, hidden.shape[0], chunk):
        h, g = hidden[s:s + chunk], grad_out[s:s + chunk]
        # grad_logits = g · (onehot − softmax), built in place in the recomputed logits [chunk, V]
        logits = _mm_fp32(h, weight.T) if lse is None else (h @ weight.T).float()
        norm = logits.logsumexp(-1, keepdim=True) if lse is None else lse[s:s + chunk, None]
        grad_logits = logits.sub_(norm).exp_().mul_(-g[:, None])
        grad_logits.scatter_add_(-1, targets[s:s + chunk, None], g[:, None])
        low = grad_logits.to(weight.dtype)  # the matmuls' input, cast once
        if grad_hidden is not None:
            grad_hidden[s:s + chunk] = (low @ weight).to(hidden.dtype)
        if grad_weight is not None:
            if hidden.is_cuda and hidden.dtype != torch.float32:
                grad_weight += _mm_fp32(low.T, h)  # each chunk's product unrounded, summed in fp32
            else:
                grad_weight.addmm_(grad_logits.T, h.float())  # in place: no [V, H] temporary per chunk
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return grad_hidden, grad_weight


CHUNK_BYTES = 16 * 2**20  # fp32 logits per chunk: 16 MB is 131 tokens of a 32000-word vocabulary
BACKWARD_CHUNK_BYTES = 256 * 2**20  # the fused kernel's backward: 2048 tokens at V 32000, so few [V, H] updates


def token_logprobs_torch(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX,
                         chunk: int | None = None) -> Tensor:
    """log p(targets[t]) [T] fp32 from hidden [T, H] and the lm_head weight [V, H], `chunk` tokens at a time
    (default: as many as keep one chunk's fp32 logits within CHUNK_BYTES)."""
    chunk = chunk or max(16, CHUNK_BYTES // (4 * weight.shape[0]))
    return _ChunkedLogprobs.apply(hidden, weight, targets, ignore_index, chunk)
