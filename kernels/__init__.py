"""The log-prob of given targets — minalign's common currency — in three implementations side by side, and the one
public function that picks among them:

    log p(y_t) = h_t · w_{y_t} − log Σ_v exp(h_t · w_v)          h_t: final hidden state, w_v: lm_head row v

    kernels/reference.py  token_logprobs_reference: full logits, exact (fp32 or fp64) — what tests compare against
    kernels/chunked.py    token_logprobs_torch: `chunk` tokens at a time in torch, any device (the CPU path)
    kernels/logprob.py    the fused Triton kernel: no [T, V] logits at all (CUDA; triton's interpreter in tests)

Full logits [T, V] are never held at once outside the reference: 4k tokens × 32k vocab in fp32 is 512 MB, and its
gradient again. `token_logprobs` (also `minalign.token_logprobs`) dispatches — the fused kernel on CUDA, the
chunked torch path elsewhere — so callers never choose. Each is layered kernel -> autograd.Function -> function.
"""
from __future__ import annotations

import functools
import sys

from torch import Tensor

from kernels.chunked import CHUNK_BYTES, token_logprobs_torch
from kernels.reference import IGNORE_INDEX, token_logprobs_reference

__all__ = ["token_logprobs", "token_logprobs_torch", "token_logprobs_reference", "IGNORE_INDEX", "CHUNK_BYTES"]


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
