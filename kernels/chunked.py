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
