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


def test_rdpo_by_hand():
    """R-DPO: −log σ(β h + α (|y_w| − |y_l|)). h = 1, β 0.1, α 0.05: a chosen answer 20 tokens longer gives
    z = 0.1 + 1 = 1.1, one 20 tokens shorter z = 0.1 − 1 = −0.9; α 0 is the sigmoid loss. The gradient
    d/d log π(y_w) = −β σ(−z): smaller than DPO's −β σ(−0.1) where the chosen answer is the longer one (the
    policy learns less from a preference length may explain), larger where it is the shorter one."""
    pc, pr, rc, rr = pairs([-10.0, -10.0], [-14.0, -14.0], [-12.0, -12.0], [-15.0, -15.0])
    pc.requires_grad_(True)
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="rdpo", alpha=0.05,
                                        chosen_lengths=torch.tensor([30, 10]), rejected_lengths=torch.tensor([10, 30]))
    assert losses.tolist() == pytest.approx([-logsig(1.1), -logsig(-0.9)], abs=1e-12)
    assert chosen.tolist() == pytest.approx([0.2, 0.2]) and rejected.tolist() == pytest.approx([0.1, 0.1])
    losses.sum().backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert pc.grad.tolist() == pytest.approx([-0.1 * sig(-1.1), -0.1 * sig(0.9)], abs=1e-12)
    dpo = -0.1 * sig(-0.1)
    assert abs(pc.grad[0]) < abs(dpo) < abs(pc.grad[1])
    same, _, _ = dpo_loss(*MARGIN_ONE, beta=0.1, loss_type="rdpo", alpha=0.0, chosen_lengths=torch.tensor([30]),
                          rejected_lengths=torch.tensor([10]))
    assert same.item() == pytest.approx(-logsig(0.1), abs=1e-12)


def test_simpo_by_hand():
    """SimPO: −log σ(β (log π(y_w)/|y_w| − log π(y_l)/|y_l|) − γ), no reference. log π(y_w) −10 over 4 tokens
    (−2.5 a token), log π(y_l) −14 over 2 (−7); β 2, γ 0.5: z = 2 · 4.5 − 0.5 = 8.5. Rewards β log π / |y|: −5 and
    −14. d/d log π(y_w) = −(β / |y_w|) σ(−z), d/d log π(y_l) = +(β / |y_l|) σ(−z)."""
    pc, pr = torch.tensor([-10.0], dtype=torch.float64, requires_grad=True), torch.tensor([-14.0], dtype=torch.float64,
                                                                                       requires_grad=True)
    losses, chosen, rejected = dpo_loss(pc, pr, None, None, beta=2.0, loss_type="simpo", gamma=0.5,
                                        chosen_lengths=torch.tensor([4]), rejected_lengths=torch.tensor([2]))
    assert losses.item() == pytest.approx(-logsig(8.5), abs=1e-12)
    assert chosen.item() == pytest.approx(-5.0) and rejected.item() == pytest.approx(-14.0)
    losses.sum().backward()
    s = 1 / (1 + math.exp(8.5))
    assert pc.grad.item() == pytest.approx(-0.5 * s, abs=1e-15) and pr.grad.item() == pytest.approx(1.0 * s, abs=1e-15)
    with pytest.raises(ValueError, match="simpo is reference-free"):
        dpo_loss(*MARGIN_ONE, beta=2.0, loss_type="simpo", chosen_lengths=torch.ones(1), rejected_lengths=torch.ones(1))
    with pytest.raises(ValueError, match="the sigmoid loss needs the reference's log-probs"):
        dpo_loss(pc, pr, None, None, beta=0.1)
    with pytest.raises(ValueError, match="the simpo loss reads the responses' lengths"):
        dpo_loss(pc, pr, None, None, beta=2.0, loss_type="simpo")


def test_simpo_equals_trl():
    """TRL's SimPO (the CPO trainer's loss_type "simpo", which averages each response's log-probs over its tokens,
    with simpo_gamma = γ and cpo_alpha 0): the same losses and rewards."""
    import os
    from types import SimpleNamespace
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # its CPO trainer lives in trl.experimental
    try:
        from trl.experimental.cpo import CPOTrainer  # trl >= 0.2x
    except ImportError:
        from trl import CPOTrainer
    torch.manual_seed(0)
    sums_w, sums_l = -30 * torch.rand(8, dtype=torch.float64), -30 * torch.rand(8, dtype=torch.float64)
    len_w, len_l = torch.randint(1, 40, (8,)), torch.randint(1, 40, (8,))
    for beta, gamma in [(2.0, 0.5), (2.5, 1.4), (0.1, 0.0)]:
        trl = SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, loss_type="simpo", label_smoothing=0.0,
                              accelerator=SimpleNamespace(device="cpu"))
        want = CPOTrainer.cpo_loss(trl, sums_w / len_w, sums_l / len_l)
        got = dpo_loss(sums_w, sums_l, None, None, beta=beta, loss_type="simpo", gamma=gamma, chosen_lengths=len_w,
                       rejected_lengths=len_l)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
