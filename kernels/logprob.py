"""Fused log-prob of given targets: hidden states [T, H] × lm_head weight [V, H] → log p(target) [T], fp32.

    log p(y_t) = h_t · w_{y_t} − lse_t,     lse_t = log Σ_v exp(h_t · w_v)

Forward: one program per (block of BLOCK_T tokens, split of the vocabulary) walks its split in BLOCK_V tiles; each
tile of logits is a tl.dot over H in BLOCK_H steps (fp32 accumulation), folded into an online log-sum-exp, and the
target's logit is picked from the tile it falls in. The splits' partial (max, sum) are combined in torch,

    lse = m + log Σ_j s_j exp(m_j − m),    m = max_j m_j

as flash-decoding combines its splits: one program per token block alone would be 64 programs at T = 4096 on a
132-SM GPU, under one wave (vocab_splits). Only [splits, T] partials, out [T] and lse [T] are written: no [T, V]
logits.

Backward, for any upstream gradient g [T]: d out_t / d logit_{t,v} = 1[v = y_t] − softmax_{t,v}, so
grad_logits = g_t · (onehot − exp(logit − lse_t)), recomputed chunk by chunk and multiplied out with cuBLAS
(kernels.chunked.logprob_grads, Liger-Kernel's approach): an earlier Triton backward added every (token block,
vocabulary tile) into grad_weight with fp32 atomics, ~50 GB of read-modify-writes at T = 4096, V = 32000,
H = 4096, against a few GB this way (docs/benchmarks.md has the estimates).

Layering: @triton.jit kernel → LogprobFunction (autograd) → token_logprobs(). Offsets are int64, so
T·V or V·H past 2³¹ are safe. fp32 inputs use IEEE fp32 dots (no TF32), as torch's fp32 matmul does.

Under the CPU interpreter (TRITON_INTERPRET=1) tiles are upcast to fp32 before tl.dot: triton 3.9's
interpreter returns garbage for bf16/fp16 dots. The products of two bf16 numbers are exact in fp32, so an
fp32 dot of upcast tiles computes what a bf16 tensor-core dot with fp32 accumulation does.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.chunked import BACKWARD_CHUNK_BYTES, logprob_grads


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation (see the module docstring for UPCAST)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logit_tile(h_ptr, w_ptr, offs_t, mask_t, offs_v, mask_v, H, stride_h, stride_w,
                BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
                UPCAST: tl.constexpr):
    """Logits [BLOCK_T, BLOCK_V] = h[offs_t] @ w[offs_v]ᵀ, accumulated in fp32 over H in BLOCK_H steps."""
    acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        h = tl.load(h_ptr + offs_t[:, None] * stride_h + offs_h[None, :], mask=mask_t[:, None] & mask_h[None, :],
                    other=0.0)
        w = tl.load(w_ptr + offs_v[:, None] * stride_w + offs_h[None, :], mask=mask_v[:, None] & mask_h[None, :],
                    other=0.0)
        acc = _dot(h, tl.trans(w), acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _forward_kernel(h_ptr, w_ptr, targets_ptr, max_ptr, sum_ptr, target_ptr, T, V, V_PER_SPLIT, H, stride_h,
                    stride_w, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Program (token block i, vocabulary split j): the online log-sum-exp state (max, Σ exp(logit − max)) and the
    target's logit (0 unless the target is in the split) over split j's vocabulary, into row j of the partials."""
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    split = tl.program_id(1).to(tl.int64)
    v_start = split * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    target = tl.load(targets_ptr + offs_t, mask=mask_t, other=-1)
    running_max = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_T], dtype=tl.float32)  # Σ exp(logit − running_max)
    target_logit = tl.zeros([BLOCK_T], dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        mask_v = offs_v < v_end
        logits = _logit_tile(h_ptr, w_ptr, offs_t, mask_t, offs_v, mask_v, H, stride_h, stride_w,
                             BLOCK_T, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
        logits = tl.where(mask_v[None, :], logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
        target_logit += tl.sum(tl.where(offs_v[None, :] == target[:, None], logits, 0.0), axis=1)
    tl.store(max_ptr + split * T + offs_t, running_max, mask=mask_t)
    tl.store(sum_ptr + split * T + offs_t, running_sum, mask=mask_t)
    tl.store(target_ptr + split * T + offs_t, target_logit, mask=mask_t)


# Block sizes (BLOCK_T, BLOCK_V, BLOCK_H); tl.dot needs every side ≥ 16. Set from outside (the tests shrink them to
# keep the CPU interpreter fast; a benchmark may tune them). SPLITS: vocabulary splits of the forward (None: enough
# for WAVES programs per SM on CUDA, 1 elsewhere); the tests set it.
BLOCKS = {"forward": (64, 128, 64)}
SPLITS: int | None = None
WAVES = 4


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for bf16/fp16 inputs


def vocab_splits(T: int, V: int, BT: int, BV: int, device: torch.device) -> int:
    """How many programs share a token block's vocabulary: one program per 64 tokens walking all of V leaves most
    SMs idle at T = 4096 (64 programs on 132 SMs), so V is split until there are WAVES programs per SM (at most one
    split per vocabulary tile), and the partial log-sum-exps are combined afterwards."""
    if SPLITS is not None:
        return max(1, min(SPLITS, triton.cdiv(V, BV)))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(V, BV), triton.cdiv(WAVES * sms, triton.cdiv(T, BT))))


class LogprobFunction(torch.autograd.Function):
    """Autograd wrapper: the fused forward saves hidden, weight and targets; backward is kernels.chunked's (cuBLAS
    matmuls over token chunks, module doc)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index):
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        if hidden.dtype != weight.dtype:
            raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}")
        T, H = hidden.shape
        V = weight.shape[0]
        BT, BV, BH = BLOCKS["forward"]
        splits = vocab_splits(T, V, BT, BV, hidden.device)
        per_split = triton.cdiv(triton.cdiv(V, splits), BV) * BV  # a whole number of tiles per split
        splits = triton.cdiv(V, per_split)
        maxes, sums, picked = (torch.empty(splits, T, dtype=torch.float32, device=hidden.device) for _ in range(3))
        if T:
            _forward_kernel[(triton.cdiv(T, BT), splits)](
                hidden, weight, targets, maxes, sums, picked, T, V, per_split, H, hidden.stride(0), weight.stride(0),
                BLOCK_T=BT, BLOCK_V=BV, BLOCK_H=BH, PRECISION=_precision(hidden.dtype), UPCAST=INTERPRET)
        # lse = m + log Σ_j s_j exp(m_j − m) over the splits' (m_j, s_j); only the target's split picked its logit
        m = maxes.max(0).values
        lse = m + torch.log((sums * torch.exp(maxes - m)).sum(0))
        keep = targets != ignore_index
        out = torch.where(keep, picked.sum(0) - lse, 0.0)
        ctx.save_for_backward(hidden, weight, torch.where(keep, targets, 0), keep)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, keep = ctx.saved_tensors
        chunk = max(16, BACKWARD_CHUNK_BYTES // (4 * weight.shape[0]))
        grad_h, grad_w = logprob_grads(hidden, weight, targets, keep, None, grad_out, chunk, ctx.needs_input_grad[:2])
        return grad_h, grad_w, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   ignore_index: int = -100) -> torch.Tensor:
    """log p(targets[t]) [T] fp32 from hidden [T, H] and weight [V, H] (0 where ignored); differentiable."""
    return LogprobFunction.apply(hidden, weight, targets, ignore_index)
