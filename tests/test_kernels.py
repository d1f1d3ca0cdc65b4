"""The fused Triton log-prob kernel against an fp32 reference (natively on a GPU, else under TRITON_INTERPRET=1).

Criterion (Cut Cross-Entropy's): |kernel − exact| ≤ |torch at the same precision − exact| + tol, the exact
reference computed in float64,
worst case over elements, for the forward values and both gradients. In bf16 tol includes one bf16 ulp of the
largest value: gradients are returned in bf16, and that last rounding alone is up to half an ulp either way.
"""
import os

import pytest
import torch

from kernels import logprob
from kernels import token_logprobs_reference

ON_GPU = torch.cuda.is_available()  # else tests/conftest.py has set TRITON_INTERPRET=1
assert ON_GPU or os.environ.get("TRITON_INTERPRET") == "1", "the kernels need a GPU or the interpreter"

DEVICE = "cuda" if ON_GPU else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-3}
ULPS = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8}  # bf16 keeps 8 significant bits


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Small tiles on the CPU interpreter (fast, and many ragged tiles per test shape), and the vocabulary in 3
    splits (ragged too: the last one shorter) whose partial log-sum-exps are combined; defaults on a GPU."""
    if not ON_GPU:
        monkeypatch.setitem(logprob.BLOCKS, "forward", (16, 64, 32))
        monkeypatch.setattr(logprob, "SPLITS", 3)


def make(T, H, V, dtype, scale=1.0, seed=0, ignored=()):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(T, H, generator=g) * scale).to(DEVICE, dtype)
    weight = (torch.randn(V, H, generator=g) * scale / H ** 0.5 * 4).to(DEVICE, dtype)
    targets = torch.randint(0, V, (T,), generator=g).to(DEVICE)
    for i in ignored:
        targets[i] = -100
    upstream = torch.randn(T, generator=g).to(DEVICE)
    return hidden, weight, targets, upstream


def value_and_grads(fn, hidden, weight, targets, upstream):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fn(h, w, targets)
    gh, gw = torch.autograd.grad((out * upstream).sum(), [h, w])
    return out.double(), gh.double(), gw.double()


def torch_low_precision(h, w, targets):
    """What plain torch computes at the inputs' precision: logits in that dtype, log_softmax in fp32."""
    logits = (h @ w.T).float()
    keep = targets != -100
    picked = logits.log_softmax(-1).gather(-1, torch.where(keep, targets, 0)[:, None]).squeeze(-1)
    return torch.where(keep, picked, 0.0)


def check_against_reference(T, H, V, dtype, **kw):
    hidden, weight, targets, upstream = make(T, H, V, dtype, **kw)
    kernel = value_and_grads(logprob.token_logprobs, hidden, weight, targets, upstream)
    exact = value_and_grads(token_logprobs_reference, hidden.double(), weight.double(), targets, upstream.double())
    lowp = value_and_grads(torch_low_precision, hidden, weight, targets, upstream)
    for name, k, e, l in zip(("log-probs", "grad_hidden", "grad_weight"), kernel, exact, lowp):
        assert torch.isfinite(k).all(), f"{name}: non-finite values"
        tol = TOL[dtype] + ULPS[dtype] * e.abs().max().item()
        err, budget = (k - e).abs().max().item(), (l - e).abs().max().item() + tol
        assert err <= budget, f"{dtype} T={T} H={H} V={V} {name}: |kernel − exact| = {err:.3g} > {budget:.3g}"
    return kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, H, V", [(31, 123, 507), (1, 40, 100), (20, 16, 33)])
def test_matches_fp32_reference_on_ragged_shapes(T, H, V, dtype):
    check_against_reference(T, H, V, dtype, ignored=[0] if T > 1 else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_logits_stay_finite(dtype):
    """Logits scaled ×100 (hidden ×10, weight ×10): the online log-sum-exp must not overflow."""
    out, _, _ = check_against_reference(19, 48, 211, dtype, scale=10.0)
    assert out.abs().max() > 50, "the scaled case should produce large log-probs"


def test_ignored_tokens_give_zero_and_no_gradient():
    hidden, weight, targets, upstream = make(18, 40, 97, torch.float32, ignored=[2, 5, 17])
    out, gh, _ = value_and_grads(logprob.token_logprobs, hidden, weight, targets, upstream)
    assert out[[2, 5, 17]].eq(0).all() and gh[[2, 5, 17]].eq(0).all()
    all_ignored = torch.full_like(targets, -100)
    out, gh, gw = value_and_grads(logprob.token_logprobs, hidden, weight, all_ignored, upstream)
    assert out.eq(0).all() and gh.eq(0).all() and gw.eq(0).all()


def test_default_block_sizes(monkeypatch):
    """The blocks a GPU run uses (64 tokens, 128 vocab, 64 hidden), with shapes that are not multiples."""
    monkeypatch.setitem(logprob.BLOCKS, "forward", (64, 128, 64))
    check_against_reference(70, 72, 300, torch.float32)


@pytest.mark.parametrize("splits", [1, 2, 7, 100])
def test_vocabulary_splits_combine_to_the_same_log_probs(monkeypatch, splits):
    """One split (a program walks all of V) or many (at most one per vocabulary tile: 100 is cut to 8 here), the
    same log-probs within fp32 rounding, and each within the reference's budget."""
    monkeypatch.setattr(logprob, "SPLITS", splits)
    assert logprob.vocab_splits(4096, 32000, 64, 128, torch.device("cpu")) == min(splits, 250)
    out, _, _ = check_against_reference(21, 40, 500, torch.float32, ignored=[3])
    monkeypatch.setattr(logprob, "SPLITS", 1)
    whole, _, _ = value_and_grads(logprob.token_logprobs, *make(21, 40, 500, torch.float32, ignored=[3]))
    assert (out - whole).abs().max() < 1e-5, (out - whole).abs().max()


def test_empty_input():
    hidden, weight, targets, upstream = make(0, 16, 20, torch.float32)
    out, gh, gw = value_and_grads(logprob.token_logprobs, hidden, weight, targets, upstream)
    assert out.shape == (0,) and gh.shape == (0, 16) and gw.eq(0).all()
