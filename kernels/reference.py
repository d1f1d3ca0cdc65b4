"""The exact log-prob of given targets, with full logits: the reference every faster path is tested against.

    log p(y_t) = log_softmax(h_t · Wᵀ)[y_t]
"""
from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def token_logprobs_reference(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """log_softmax(hidden @ weight.T)[t, targets[t]] with full logits (at least fp32); 0 where ignored. For tests."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or float64 when the caller wants it exact
    logits = hidden.to(dtype) @ weight.to(dtype).T  # [T, V]
    keep = targets != ignore_index
    picked = logits.log_softmax(-1).gather(-1, torch.where(keep, targets, 0)[:, None]).squeeze(-1)
    return torch.where(keep, picked, 0.0)
