"""Log-probs of whole responses given their prompts, in packed forwards: the scorer's, the DPO reference pass's
and the trainer's one way to run the policy.

    log π(y | x) = Σ_t log π(y_t | x, y_<t)           over the response tokens, each from kernels.token_logprobs

Only the positions that predict a response token go through the lm_head, and never as full logits
(kernels/: the fused kernel on CUDA, the chunked torch path elsewhere).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import IGNORE_INDEX, token_logprobs
from minalign.model import load_balancing_loss


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


@dataclass
class SequenceLogprobs:
    """What sequence_logprobs returns; it unpacks as `sums, counts = sequence_logprobs(...)`."""

    sums: Tensor  # [N] fp32: Σ_t log π(response_t | prompt, response_<t)
    counts: Tensor  # [N] int64: the number of terms of each sum
    aux_loss: Tensor  # []: Mixtral's router load-balancing loss, the mean over the forwards (0 for a dense model)
    terms: list[Tensor] | None = None  # with per_token: each sum's terms log π(response_t | ...), [counts[i]] fp32

    def __iter__(self):
        return iter((self.sums, self.counts))


def sequence_logprobs(model, prompts: list[list[int]], responses: list[list[int]], *,
                      batch_tokens: int = 16384, response_masks: list[list[bool]] | None = None,
                      per_token: bool = False) -> SequenceLogprobs:
    """(sums [N] fp32, counts [N] int64, aux_loss): Σ_t log π(response_t | prompt, response_<t), the number of
    terms, and the router's load-balancing loss (for training; padding excluded).

    Sequences are sorted by length and packed into forwards of at most ~batch_tokens (padded) tokens; only
    the positions that predict a response token go through the lm_head. Results in input order, on the
    model's device; differentiable when grad is enabled.

    response_masks: per response, which of its tokens count (a multi-turn SFT conversation after its first
    reply: the later user turns are context, not targets); None counts every response token.
    model may be a wrapper with the Transformer as `.module` (DDP): it is called, its `.module` supplies the
    config and the lm_head weight. per_token: also return each sum's terms (`terms`), the very values summed.
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
        return SequenceLogprobs(torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long, device=device), aux,
                                [] if per_token else None)
    sums = torch.zeros(N, dtype=torch.float32, device=device)
    terms: list[Tensor | None] = [None] * N
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
        hidden, router_logits = model(tokens.to(device), return_hidden=True, return_router_logits=True)  # [B, T, H]
        if router_logits:  # Mixtral: the padding (right of each sequence) takes no part in the balance
            real = (torch.arange(T)[None] < torch.tensor([[len(prompts[i]) + len(responses[i])] for i in batch]))
            aux = aux + load_balancing_loss(router_logits, core.config.num_experts_per_tok,
                                            real.to(device)) / len(batches)
        targets = targets.to(device)
        picked = targets != IGNORE_INDEX  # [B, T]
        head_h, head_w = hidden[picked], core.lm_head.weight
        if torch.is_autocast_enabled(device.type):  # autocast does not reach into a custom autograd.Function: cast
            dt = torch.get_autocast_dtype(device.type)  # as it would cast the lm_head's matmul
            head_h, head_w = head_h.to(dt), head_w.to(dt)
        logp = token_logprobs(head_h, head_w, targets[picked])  # [n_response_tokens]
        rows = torch.tensor(batch, device=device)[:, None].expand(len(batch), T)[picked]
        sums = sums.index_add(0, rows, logp)
        if per_token:  # logp is row-major over picked: each sequence's terms in order, one sequence after another
            for i, part in zip(batch, logp.detach().split(picked.sum(1).tolist())):
                terms[i] = part
    return SequenceLogprobs(sums, counts, aux, terms if per_token else None)
