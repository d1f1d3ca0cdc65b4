"""The SFT and DPO losses, written from their definitions. Both take per-sequence log-prob sums — what
minalign.sequence_logprobs returns — so no logits reach this module.

DPO (Rafailov et al. 2023), with the policy's and the reference's log-probs of a chosen (y_w) and a rejected (y_l)
response to the same prompt:

    h = (log π(y_w) − log π(y_l)) − (log π_ref(y_w) − log π_ref(y_l))          the log-ratio margin
    sigmoid:  −(1 − ε) log σ(β h) − ε log σ(−β h)     ε = label_smoothing (conservative DPO: labels flipped w.p. ε)
    ipo:      (h̄ − 1/(2β))²                             (Azar et al. 2023, Eq. 17; β is the paper's τ)
              h̄ = (log π(y_w) − log π_ref(y_w)) / |y_w| − (log π(y_l) − log π_ref(y_l)) / |y_l|
    hinge:    max(0, 1 − β h)                           (SLiC)
    rdpo:     −log σ(β h + α (|y_w| − |y_l|))           (R-DPO, Park et al. 2024; α = alpha)
    simpo:    −log σ(β (log π(y_w) / |y_w| − log π(y_l) / |y_l|) − γ)  (SimPO, Meng et al. 2024; γ = gamma)

IPO's log-ratios are per-token means, |y| the response's token count (at least 1): what TRL does in every
version, and what the IPO authors confirmed their results use. On sums the squared loss grows with the responses'
lengths, so the same β would mean something else for every dataset.

R-DPO's sign: the paper adds a length penalty α|y| to the RL objective, max E[r(x, y) − α|y|] − β KL, so the
implicit reward becomes r = β log π/π_ref + α|y| (+ a prompt's constant), and the Bradley–Terry likelihood of
r_w − r_l puts +α(|y_w| − |y_l|) inside the sigmoid. A pair whose chosen answer is the longer one then starts
with part of its margin granted: its gradient is smaller, so the policy learns less from the length-driven
preferences (the point of the regulariser).

SimPO needs no reference model at all (the trainer loads none and computes no reference log-probs); its reward
is the length-averaged log-prob β·log π(y)/|y|, so a long answer gains nothing by being long, and γ is the
margin the chosen reward must clear.

The rewards that come back with the loss, for metrics: β (log π(y) − log π_ref(y)), the summed log-ratios, for
every loss type with a reference (as TRL reports them, so reward metrics compare across losses); SimPO's own
β log π(y) / |y| for simpo (as the SimPO code and TRL's CPO trainer report it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "rdpo", "simpo")
LENGTH_AWARE = ("ipo", "rdpo", "simpo")  # the loss types that read the responses' token counts


def sft_loss(logprob_sums: Tensor, num_tokens: int) -> Tensor:
    """−Σ log π(response tokens) / num_tokens, with num_tokens counted over the whole global batch.

    Dividing by the global count (not averaging per micro-batch) keeps every token's weight equal under gradient
    accumulation and across ranks: Σ over micro-batches and ranks of these losses is the true mean NLL.
    """
    if num_tokens <= 0:
        raise ValueError(f"sft_loss needs at least one response token in the global batch, got {num_tokens}")
    return -logprob_sums.sum() / num_tokens


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None,
             ref_rejected_logps: Tensor | None, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_nll: Tensor | None = None, nll_weight: float = 0.0, chosen_lengths: Tensor | None = None,
             rejected_lengths: Tensor | None = None, alpha: float = 0.0,
             gamma: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(per-pair losses [B], chosen rewards [B], rejected rewards [B]); see the module docstring for the formulas.

    chosen_lengths, rejected_lengths: each response's token count [B] (what sequence_logprobs returns as
    counts); required by the LENGTH_AWARE types. ref_*: the reference's sums; None for simpo (reference-free).
    alpha: rdpo's length coefficient; gamma: simpo's target margin.
    chosen_nll, nll_weight: an optional NLL term on the chosen responses (per pair, e.g. their mean token NLL),
    added as nll_weight · chosen_nll (the "DPO + NLL" / RPO regulariser).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; known: {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to the sigmoid loss only, not {loss_type!r}")
    if loss_type in LENGTH_AWARE and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"the {loss_type} loss reads the responses' lengths: pass chosen_lengths and "
                         f"rejected_lengths")
    if (ref_chosen_logps is None) != (loss_type == "simpo"):
        raise ValueError("simpo is reference-free: pass no reference log-probs" if loss_type == "simpo"
                         else f"the {loss_type} loss needs the reference's log-probs")
    if loss_type == "simpo":
        chosen_rewards = beta * policy_chosen_logps / chosen_lengths.clamp(min=1)
        rejected_rewards = beta * policy_rejected_logps / rejected_lengths.clamp(min=1)
        losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    else:
        chosen_ratio = policy_chosen_logps - ref_chosen_logps
        rejected_ratio = policy_rejected_logps - ref_rejected_logps
        margin = chosen_ratio - rejected_ratio
        if loss_type == "sigmoid":
            losses = (-(1 - label_smoothing) * F.logsigmoid(beta * margin)
                      - label_smoothing * F.logsigmoid(-beta * margin))
        elif loss_type == "ipo":
            mean_margin = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
            losses = (mean_margin - 1 / (2 * beta)) ** 2
        elif loss_type == "rdpo":
            losses = -F.logsigmoid(beta * margin + alpha * (chosen_lengths - rejected_lengths))
        else:
            losses = torch.relu(1 - beta * margin)
        chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
    if chosen_nll is not None and nll_weight:
        losses = losses + nll_weight * chosen_nll
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def dpo_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """Reward accuracy (chosen rewarded above rejected), mean margin, mean chosen and rejected rewards."""
    return {"reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
            "chosen_reward": chosen_rewards.mean().item(),
            "rejected_reward": rejected_rewards.mean().item()}
