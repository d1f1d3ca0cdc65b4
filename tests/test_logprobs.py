"""The token-chunked torch log-prob path, the dispatch, and sequence_logprobs against plain forward passes."""
import pytest
import torch

import minalign
from kernels import token_logprobs_reference, token_logprobs_torch
from tests.tiny import hf_tiny_checkpoint


def grads(fn, hidden, weight, targets, upstream):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    out = fn(h, w, targets)
    return (out, *torch.autograd.grad((out * upstream).sum(), [h, w]))


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_chunked_torch_path_equals_reference(chunk):
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(31, 123, generator=g), torch.randn(507, 123, generator=g) * 0.3
    targets = torch.randint(0, 507, (31,), generator=g)
    targets[[0, 9]] = -100
    upstream = torch.randn(31, generator=g)
    ours = grads(lambda h, w, t: token_logprobs_torch(h, w, t, chunk=chunk), hidden, weight, targets, upstream)
    ref = grads(token_logprobs_reference, hidden, weight, targets, upstream)
    for name, a, b in zip(("log-probs", "grad_hidden", "grad_weight"), ours, ref):
        diff = (a - b).abs().max().item()
        assert diff <= 2e-5, f"chunk={chunk} {name}: max |chunked − reference| = {diff:.3g}"
    assert ours[0][[0, 9]].eq(0).all() and ours[1][[0, 9]].eq(0).all()


def test_chunked_path_in_bf16_is_as_good_as_torch_bf16():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(20, 64, generator=g).bfloat16()
    weight = (torch.randn(300, 64, generator=g) * 0.3).bfloat16()
    targets = torch.randint(0, 300, (20,), generator=g)
    exact = token_logprobs_reference(hidden.double(), weight.double(), targets)
    plain = (hidden @ weight.T).float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    ours = token_logprobs_torch(hidden, weight, targets, chunk=6)
    assert ours.dtype == torch.float32
    assert (ours - exact).abs().max() <= (plain - exact).abs().max() + 1e-3


def test_dispatch_on_cpu_is_the_torch_path():
    g = torch.Generator().manual_seed(2)
    hidden, weight, targets = torch.randn(9, 16, generator=g), torch.randn(40, 16, generator=g), torch.arange(9)
    assert torch.equal(minalign.token_logprobs(hidden, weight, targets), token_logprobs_torch(hidden, weight, targets))
    with pytest.raises(ValueError, match="hidden \\[T, H\\]"):
        minalign.token_logprobs(hidden, weight[:, :8], targets)


def plain_sequence_logprobs(model, prompt, response):
    """Σ log_softmax(full logits) of the response tokens, one sequence at a time: the obvious way."""
    seq = torch.tensor([prompt + response])
    logp = model(seq).float().log_softmax(-1)[0, len(prompt) - 1:-1]
    return logp.gather(-1, torch.tensor(response)[:, None]).sum()


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_sequence_logprobs_equal_plain_forward_passes(tmp_path, kind):
    path, _ = hf_tiny_checkpoint(tmp_path, kind)
    model = minalign.load_model(path).eval()
    g = torch.Generator().manual_seed(3)
    lengths = [(3, 5), (12, 1), (1, 9), (7, 0), (20, 14), (2, 2)]  # (prompt, response): ragged, one empty
    prompts = [torch.randint(0, 103, (p,), generator=g).tolist() for p, _ in lengths]
    responses = [torch.randint(0, 103, (r,), generator=g).tolist() for _, r in lengths]
    with torch.no_grad():
        for batch_tokens in (40, 16384):  # several packed forwards, then one
            sums, counts = minalign.sequence_logprobs(model, prompts, responses, batch_tokens=batch_tokens)
            assert counts.tolist() == [r for _, r in lengths]
            for i, (p, r) in enumerate(zip(prompts, responses)):
                expected = plain_sequence_logprobs(model, p, r).item() if r else 0.0
                assert sums[i].item() == pytest.approx(expected, abs=1e-4), f"sequence {i}, batch_tokens={batch_tokens}"


def test_sequence_logprobs_gradient_matches_plain(tmp_path):
    """Differentiable: the policy gradient of Σ sums equals that of the plain computation."""
    path, _ = hf_tiny_checkpoint(tmp_path, "mistral")
    model = minalign.load_model(path)
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    sums, _ = minalign.sequence_logprobs(model, prompts, responses)
    ours = torch.autograd.grad(sums.sum(), [model.lm_head.weight, model.model.layers[0].mlp.up_proj.weight])
    plain = sum(plain_sequence_logprobs(model, p, r) for p, r in zip(prompts, responses))
    ref = torch.autograd.grad(plain, [model.lm_head.weight, model.model.layers[0].mlp.up_proj.weight])
    for a, b in zip(ours, ref):
        assert (a - b).abs().max() <= 1e-5


def test_sequence_logprobs_bad_input(tmp_path):
    path, _ = hf_tiny_checkpoint(tmp_path, "mistral")
    model = minalign.load_model(path)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        minalign.sequence_logprobs(model, [[1], [2]], [[3]])
    with pytest.raises(ValueError, match="sequence 1: an empty prompt"):
        minalign.sequence_logprobs(model, [[1], []], [[3], [4]])
    with pytest.raises(ValueError, match="sequence 0: 250 prompt \\+ 10 response tokens exceed .* 256"):
        minalign.sequence_logprobs(model, [[1] * 250], [[3] * 10])


def test_out_of_range_targets_are_refused():
    hidden, weight = torch.randn(3, 8), torch.randn(40, 8)
    for bad in (40, -1):
        with pytest.raises(ValueError, match="targets outside \\[0, 40\\)"):
            minalign.token_logprobs(hidden, weight, torch.tensor([1, bad, -100]))
