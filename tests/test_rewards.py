"""The log-ratio reward against one computed independently with transformers' models on the same tiny checkpoints.

Policy: a tiny transformers Mixtral; reference: a tiny transformers Mistral (other weights); both with the tiny
Mistral-like tokenizer. The oracle runs the whole prompt + response through the transformers model and sums the
log-softmax at the response tokens only.
"""
import shutil
from types import SimpleNamespace

import pytest
import torch

import minalign
from minalign.chat import render_prompt
from minalign.logratio import LogRatioReward, check_same_tokenizer, cut_batches, log_ratio
from tests.test_sample_cli import one_thread  # noqa: F401 (autouse: one torch thread)
from tests.tiny import hf_tiny_checkpoint

TEMPLATES = {"policy_template": "mistral", "reference_template": "raw"}  # no defaults: given every time
ROWS = [
    {"id": 1, "prompt": "What is the quick brown fox?", "prompt_token_ids": [1, 2, 3],
     "responses": [{"text": "a", "token_ids": [45, 200, 17, 399, 2], "logprobs": [-1.0] * 5, "finish_reason": "stop"},
                   {"text": "b", "token_ids": [300], "logprobs": [-2.0], "finish_reason": "length"}]},
    {"id": "two", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "A dog?"}],
     "source": "chat",
     "responses": [{"text": "c", "token_ids": list(range(3, 40)), "logprobs": [], "finish_reason": "length"}]},
    {"id": 3, "prompt": "the cat sat on the mat " * 3,
     "responses": [{"text": "d", "token_ids": [7, 7, 7, 2], "logprobs": [], "finish_reason": "stop"},
                   {"text": "e", "token_ids": [398, 5, 12], "logprobs": [], "finish_reason": "length"},
                   {"text": "f", "token_ids": [9] * 20, "logprobs": [], "finish_reason": "length"}]},
]


def checkpoint(tmp_path_factory, kind, seed, tokenizer_dir):
    """(dir, transformers model): a tiny transformers checkpoint with the tokenizer files beside it."""
    path, hf = hf_tiny_checkpoint(tmp_path_factory.mktemp(f"{kind}{seed}"), kind, seed=seed,
                                  vocab_size=minalign.load_tokenizer(tokenizer_dir).vocab_size)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path, hf


@pytest.fixture(scope="module")
def policy(tmp_path_factory, mistral_tokenizer_dir):
    return checkpoint(tmp_path_factory, "mixtral", 1, mistral_tokenizer_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mistral_tokenizer_dir):
    return checkpoint(tmp_path_factory, "mistral", 2, mistral_tokenizer_dir)


def messages(row):
    return [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]


def oracle(hf, prompt_ids, response_ids) -> float:
    """Σ log softmax(logits)[response token] over the response tokens, from transformers' full logits (fp64)."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = hf(ids).logits[0].double().log_softmax(-1)  # [T, V]
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(response_ids) - 1)
    return logp[positions, torch.tensor(response_ids)].sum().item()


def oracle_sums(hf, tokenizer, template, rows=ROWS):
    return [[oracle(hf, render_prompt(tokenizer, template, messages(row)), r["token_ids"]) for r in row["responses"]]
            for row in rows]


def fields(rows, key):
    return [[r.get(key) for r in row["responses"]] for row in rows]


def assert_close(got, want, tol=1e-4):
    for g_row, w_row in zip(got, want, strict=True):
        for g, w in zip(g_row, w_row, strict=True):
            assert abs(g - w) <= tol * max(1.0, abs(w)), (g, w)


def test_log_ratio_matches_transformers(policy, reference, mistral_tokenizer):
    (policy_dir, hf_policy), (reference_dir, hf_reference) = policy, reference
    scored = LogRatioReward(policy_dir, reference_dir, **TEMPLATES).score(ROWS)  # mistral for the policy, raw for the ref
    want_p = oracle_sums(hf_policy, mistral_tokenizer, "mistral")
    want_r = oracle_sums(hf_reference, mistral_tokenizer, "raw")
    assert_close(fields(scored, "policy_logprob"), want_p)
    assert_close(fields(scored, "reference_logprob"), want_r)
    assert fields(scored, "num_tokens") == [[5, 1], [37], [4, 3, 20]]
    for row in scored:
        for r in row["responses"]:
            assert r["reward"] == r["policy_logprob"] - r["reference_logprob"]
    # rows keep every field in order; each response gains the four new ones after its own
    for row, given in zip(scored, ROWS, strict=True):
        assert list(row) == list(given) and {k: v for k, v in row.items() if k != "responses"} == \
            {k: v for k, v in given.items() if k != "responses"}
        for r, g in zip(row["responses"], given["responses"], strict=True):
            assert list(r) == [*g, "reward", "policy_logprob", "reference_logprob", "num_tokens"]
            assert {k: r[k] for k in g} == g
    assert ROWS[0]["responses"][0].get("reward") is None  # the input rows are not modified

    # mean and beta rescale the same sums
    mean = LogRatioReward(policy_dir, reference_dir, **TEMPLATES, normalize="mean", beta=0.5).score(ROWS)
    for row, plain in zip(mean, scored):
        for r, q in zip(row["responses"], plain["responses"]):
            assert r["policy_logprob"] == q["policy_logprob"] and r["reference_logprob"] == q["reference_logprob"]
            assert r["reward"] == pytest.approx(0.5 * q["reward"] / q["num_tokens"], rel=1e-12)
    # the reward-source interface: one float per response
    assert LogRatioReward(policy_dir, reference_dir, **TEMPLATES)(ROWS) == fields(scored, "reward")


def test_policy_equal_to_reference_gives_zero(policy):
    policy_dir, _ = policy
    scored = LogRatioReward(policy_dir, policy_dir, policy_template="mistral", reference_template="mistral").score(ROWS)
    assert fields(scored, "reward") == [[0.0, 0.0], [0.0], [0.0, 0.0, 0.0]]
    assert all(p < 0 for row in fields(scored, "policy_logprob") for p in row)


def test_templates_change_only_the_prompt(policy, mistral_tokenizer):
    """One model, two templates: each sum is the oracle's over the same response ids after that template's prompt."""
    policy_dir, hf = policy
    scored = LogRatioReward(policy_dir, policy_dir, policy_template="mistral", reference_template="raw").score(ROWS)
    assert_close(fields(scored, "policy_logprob"), oracle_sums(hf, mistral_tokenizer, "mistral"))
    assert_close(fields(scored, "reference_logprob"), oracle_sums(hf, mistral_tokenizer, "raw"))
    assert all(r != 0 for row in fields(scored, "reward") for r in row)


def test_reference_free(policy, mistral_tokenizer):
    policy_dir, hf = policy
    scored = LogRatioReward(policy_dir, None, policy_template="mistral", beta=2.0).score(ROWS)
    assert_close(fields(scored, "policy_logprob"), oracle_sums(hf, mistral_tokenizer, "mistral"))
    for row in scored:
        for r in row["responses"]:
            assert "reference_logprob" not in r and r["reward"] == 2.0 * r["policy_logprob"]
    mean = LogRatioReward(policy_dir, None, policy_template="mistral", normalize="mean").score(ROWS)
    for row in mean:
        for r in row["responses"]:
            assert r["reward"] == r["policy_logprob"] / r["num_tokens"]


def test_sampler_end_token_is_scored_as_the_templates_end(policy, mistral_tokenizer):
    """A reply ending with the sampler's end id (here 45, standing in for Merlinite's <|endoftext|>) is scored as
    ending with the template's own end token, </s> (2) for mistral."""
    policy_dir, hf = policy
    rows = [{"prompt": "Hi", "responses": [{"token_ids": [17, 45]}, {"token_ids": [45, 17]}]}]
    scored = LogRatioReward(policy_dir, None, policy_template="mistral", sampler_end_ids=[45]).score(rows)
    prompt = render_prompt(mistral_tokenizer, "mistral", "Hi")
    assert_close(fields(scored, "policy_logprob"), [[oracle(hf, prompt, [17, 2]), oracle(hf, prompt, [45, 17])]])
    assert scored[0]["responses"][0]["token_ids"] == [17, 45]  # the row itself keeps what was sampled


def test_tokenizer_mismatch_names_both_dirs(policy, tmp_path_factory, merlinite_tokenizer_dir):
    policy_dir, _ = policy
    other, _ = checkpoint(tmp_path_factory, "mistral", 3, merlinite_tokenizer_dir)  # five more added tokens
    with pytest.raises(ValueError) as info:
        LogRatioReward(policy_dir, other, **TEMPLATES)
    msg = str(info.value)
    assert f"the policy {policy_dir} and the reference {other} must share a tokenizer" in msg, msg
    assert "their added tokens differ ('<|endoftext|>'=400, '<|pad|>'=401," in msg, msg

    def fake(model_bytes):
        return SimpleNamespace(sp=SimpleNamespace(serialized_model_proto=lambda: model_bytes), added_tokens={})
    with pytest.raises(ValueError, match="the policy a and the reference b .* tokenizer.model files differ"):
        check_same_tokenizer(fake(b"one"), "a", fake(b"two"), "b")
    check_same_tokenizer(fake(b"one"), "a", fake(b"one"), "b")


@pytest.mark.parametrize("row, phrase", [
    ({"responses": [{"token_ids": [5]}]}, 'row 1: a samples row needs a "prompt"'),
    ({"prompt": 3, "responses": [{"token_ids": [5]}]}, 'row 1: "prompt" must be a string or a list of messages'),
    ({"prompt": [{"role": "bot", "content": "x"}], "responses": [{"token_ids": [5]}]}, "row 1: message 0"),
    ({"prompt": "x"}, 'row 1: a samples row needs a non-empty "responses" list'),
    ({"prompt": "x", "responses": [{"token_ids": [5]}, {"text": "y"}]}, 'row 1: responses[1] needs "token_ids"'),
    ({"prompt": "x", "responses": [{"token_ids": []}]}, 'responses[0] needs "token_ids", a non-empty list'),
    ({"prompt": "x", "responses": [{"token_ids": [5, 400, 6]}]}, "row 1: responses[0]: token id 400 is outside"),
    ({"prompt": "x", "responses": [{"token_ids": [5] * 300}]}, "response tokens exceed the context of 256"),
])
def test_bad_rows(policy, row, phrase):
    policy_dir, _ = policy
    with pytest.raises(ValueError) as info:
        LogRatioReward(policy_dir, policy_template="mistral").score([ROWS[0], row])
    assert phrase in str(info.value), str(info.value)


def test_log_ratio_formula():
    assert log_ratio(-10.0, -14.0, 4) == 4.0
    assert log_ratio(-10.0, -14.0, 4, normalize="mean", beta=0.5) == 0.5
    assert log_ratio(-10.0, None, 4, beta=0.1) == -1.0
    with pytest.raises(ValueError, match="normalize"):
        log_ratio(-1.0, -1.0, 1, normalize="max")


def test_cut_batches():
    seqs = [([1] * p, [2] * r) for p, r in [(3, 2), (10, 10), (1, 1), (4, 4), (30, 5), (2, 6)]]  # lengths 5 20 2 8 35 8
    batches = cut_batches(seqs, 24)
    assert batches == [[4], [1], [3, 5, 0], [2]], batches  # longest first; count × first length <= 24, or alone
    assert sorted(i for b in batches for i in b) == list(range(len(seqs)))
    assert cut_batches([], 24) == []


def test_call_source_checks_the_answer():
    import numpy as np
    from minalign.rewards import call_source
    rows = [{"id": "a", "responses": [{}, {}]}, {"id": "b", "responses": [{}]}]
    assert call_source(lambda r: [[1, True], [0.5]], rows, "f") == [[1.0, 1.0], [0.5]]
    assert call_source(lambda r: [np.array([1.5, 2], dtype=np.float32), [np.int64(3)]], rows, "f") == [[1.5, 2.0], [3.0]]
    for bad, phrase in [(lambda r: [[1.0, 2.0]], "one list of scores per row \\(2 rows\\), got 1 items"),
                        (lambda r: [[1.0], [2.0]], "row 0 \\(id 'a'\\) has 2 responses but got \\[1.0\\]"),
                        (lambda r: [[1.0, float("nan")], [2.0]], "row 0 \\(id 'a'\\) responses\\[1\\]: nan is not"),
                        (lambda r: [[1.0, "2"], [2.0]], "responses\\[1\\]: '2' is not a finite number"),
                        (lambda r: None, "got NoneType")]:
        with pytest.raises(ValueError, match="reward f: .*" + phrase):
            call_source(bad, rows, "f")
