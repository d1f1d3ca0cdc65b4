"""SFT and DPO losses against values derived by hand from their definitions."""
import math

import pytest
import torch

from minalign.losses import dpo_loss, dpo_metrics, sft_loss


def logsig(x):
    return -math.log1p(math.exp(-x))


def pairs(pc, pr, rc, rr):
    return [torch.tensor(v, dtype=torch.float64) for v in (pc, pr, rc, rr)]


def test_policy_equal_to_reference_gives_ln2():
    logps = pairs([-3.0, -7.5, -1.25], [-4.0, -2.0, -9.0], [-3.0, -7.5, -1.25], [-4.0, -2.0, -9.0])
    losses, chosen, rejected = dpo_loss(*logps, beta=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 3, abs=1e-12)
    assert chosen.eq(0).all() and rejected.eq(0).all()


# policy prefers chosen by 3 nats more than the reference does: margin h = (−10 − −14) − (−12 − −15) = 1
MARGIN_ONE = pairs([-10.0], [-14.0], [-12.0], [-15.0])


@pytest.mark.parametrize("loss_type, beta, smoothing, expected", [
    ("sigmoid", 0.1, 0.0, -logsig(0.1)),                                  # ln(1 + e^−0.1) = 0.644397
    ("sigmoid", 0.5, 0.0, -logsig(0.5)),
    ("sigmoid", 0.1, 0.1, -0.9 * logsig(0.1) - 0.1 * logsig(-0.1)),      # conservative DPO
    ("sigmoid", 0.01, 0.25, -0.75 * logsig(0.01) - 0.25 * logsig(-0.01)),
    ("ipo", 0.1, 0.0, (1 - 1 / 0.2) ** 2),                                # (1 − 5)² = 16
    ("ipo", 0.5, 0.0, 0.0),                                               # h = 1/(2β) exactly: zero loss
    ("hinge", 0.1, 0.0, 0.9),                                             # max(0, 1 − 0.1)
    ("hinge", 2.0, 0.0, 0.0),                                             # max(0, 1 − 2)
])
def test_dpo_loss_by_hand(loss_type, beta, smoothing, expected):
    ones = torch.ones(1)  # one-token responses: IPO's per-token mean is the sum
    losses, chosen, rejected = dpo_loss(*MARGIN_ONE, beta=beta, loss_type=loss_type, label_smoothing=smoothing,
                                        chosen_lengths=ones, rejected_lengths=ones)
    assert losses.item() == pytest.approx(expected, abs=1e-12)
    assert chosen.item() == pytest.approx(beta * 2.0) and rejected.item() == pytest.approx(beta * 1.0)


def test_ipo_averages_each_log_ratio_over_its_tokens():
    """TRL's IPO (and its authors'): h̄ = ratio_w / |y_w| − ratio_l / |y_l|, loss (h̄ − 1/(2β))², rewards summed.

    Pair 1: ratios 2 (4 tokens) and 1 (2 tokens): h̄ = 0.5 − 0.5 = 0; β 0.1: (0 − 5)² = 25 (on sums: (1 − 5)² = 16).
    Pair 2: ratios 2 (1 token) and 1 (8 tokens): h̄ = 2 − 0.125 = 1.875; β 0.1: (1.875 − 5)² = 9.765625.
    d loss / d log π(y_w) = 2 (h̄ − 5) / |y_w|: −2.5 and −6.25; d / d log π(y_l) = −2 (h̄ − 5) / |y_l|: 5 and 0.78125.
    """
    pc, pr, rc, rr = pairs([-10.0, -10.0], [-14.0, -14.0], [-12.0, -12.0], [-15.0, -15.0])
    pc.requires_grad_(True), pr.requires_grad_(True)
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo",
                                        chosen_lengths=torch.tensor([4, 1]), rejected_lengths=torch.tensor([2, 8]))
    assert losses.tolist() == pytest.approx([25.0, 9.765625], abs=1e-12)
    assert chosen.tolist() == pytest.approx([0.2, 0.2]) and rejected.tolist() == pytest.approx([0.1, 0.1])
    losses.sum().backward()
    assert pc.grad.tolist() == pytest.approx([-2.5, -6.25]) and pr.grad.tolist() == pytest.approx([5.0, 0.78125])
    with pytest.raises(ValueError, match="pass chosen_lengths and rejected_lengths"):
        dpo_loss(*MARGIN_ONE, beta=0.1, loss_type="ipo")


def test_sigmoid_gradient_by_hand():
    """d/dπ(y_w) of −log σ(β h) is −β σ(−β h); of π(y_l) the opposite."""
    pc, pr, rc, rr = (t.clone().requires_grad_(i < 2) for i, t in enumerate(MARGIN_ONE))
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    losses.sum().backward()
    s = 1 / (1 + math.exp(0.1))  # σ(−0.1)
    assert pc.grad.item() == pytest.approx(-0.1 * s) and pr.grad.item() == pytest.approx(0.1 * s)


def test_nll_term_and_metrics():
    losses, chosen, rejected = dpo_loss(*MARGIN_ONE, beta=0.1, chosen_nll=torch.tensor([2.5], dtype=torch.float64),
                                        nll_weight=0.2)
    assert losses.item() == pytest.approx(-logsig(0.1) + 0.2 * 2.5)
    m = dpo_metrics(torch.tensor([0.3, -0.1, 0.2]), torch.tensor([0.1, 0.0, 0.2]))
    assert m == pytest.approx({"reward_accuracy": 1 / 3, "reward_margin": 0.1 / 3, "chosen_reward": 0.4 / 3,
                               "rejected_reward": 0.1})


def test_sft_loss_is_normalised_by_the_global_token_count():
    """Two micro-batches of 3 and 5 response tokens: the sum of their losses is the mean NLL over all 8."""
    a, b = torch.tensor([-1.0, -2.0]), torch.tensor([-4.0])  # per-sequence log-prob sums of each micro-batch
    total = sft_loss(a, num_tokens=8) + sft_loss(b, num_tokens=8)
    assert total.item() == pytest.approx(7.0 / 8)
    with pytest.raises(ValueError, match="at least one response token"):
        sft_loss(a, 0)


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown DPO loss_type 'kto'"):
        dpo_loss(*MARGIN_ONE, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(*MARGIN_ONE, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing applies to the sigmoid loss only"):
        dpo_loss(*MARGIN_ONE, beta=0.1, loss_type="ipo", label_smoothing=0.1, chosen_lengths=torch.ones(1),
                 rejected_lengths=torch.ones(1))


def test_sft_loss_equals_transformers_causal_lm_loss(tmp_path):
    """Mean NLL of the response tokens == transformers' loss with the prompt positions labelled −100."""
    import minalign
    from tests.tiny import hf_tiny_checkpoint

    path, hf = hf_tiny_checkpoint(tmp_path, "mistral")
    model = minalign.load_model(path)
    prompts, responses = [[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14, 15, 16, 17, 18]]
    sums, counts = minalign.sequence_logprobs(model, prompts, responses)
    ours = sft_loss(sums, int(counts.sum()))
    # transformers: one padded batch, labels −100 on prompts and padding, its own shift and mean
    T = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.zeros(2, T, dtype=torch.long)
    labels = torch.full((2, T), -100)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids[b, :len(p) + len(r)] = torch.tensor(p + r)
        labels[b, len(p):len(p) + len(r)] = torch.tensor(r)
    ref = hf(ids, labels=labels).loss
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
