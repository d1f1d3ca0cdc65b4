"""The KV-cache sampler against transformers' generate, against a full forward pass, and by hand."""
import pytest
import torch

import minalign
from minalign import sampling
from minalign.sampling import KVCache, draw, filter_logits, generate
from tests.tiny import hf_tiny_checkpoint


@pytest.fixture(scope="module", params=["mistral", "mixtral"])
def tiny_pair(request, tmp_path_factory):
    """(minalign model, transformers model) with the same random weights; sliding window 8."""
    path, hf = hf_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return minalign.load_model(path).eval(), hf


def random_prompts(lengths, vocab=103, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("slots", [None, 3])
def test_greedy_matches_transformers_generate(tiny_pair, slots):
    """A batch of different lengths (left-padded for transformers), 40 new tokens: far past the window of 8;
    every sample at once, or 3 slots refilled as samples finish."""
    model, hf = tiny_pair
    prompts = random_prompts([5, 11, 3, 17])
    new = 40
    ours = generate(model, prompts, max_new_tokens=new, temperature=0, slots=slots)
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = torch.tensor(p), 1
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    for b in range(len(prompts)):
        got, want = ours[b][0].token_ids, ref[b, T:].tolist()
        first = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), None)
        assert got == want, f"prompt {b}: first difference at new token {first}\n ours {got}\n  hf  {want}"
        assert ours[b][0].finish_reason == "length" and len(got) == new
    assert len({t for s in ours for t in s[0].token_ids}) > 10, "degenerate output proves little"


def full_forward_logprobs(model, prompt, generated):
    """log π(generated_i | prompt, generated_<i) from one forward pass over the whole sequence."""
    seq = torch.tensor([prompt + generated])
    with torch.no_grad():
        logp = model(seq).float().log_softmax(-1)[0, len(prompt) - 1:-1]
    return logp.gather(-1, torch.tensor(generated)[:, None]).squeeze(-1)


@pytest.mark.parametrize("settings", [dict(temperature=0), dict(temperature=1.3, top_k=20, top_p=0.9),
                                      dict(temperature=0.7)])
def test_logprobs_equal_a_rescoring_forward_pass(tiny_pair, settings):
    """Sample.logprobs are the untempered model log-probs of the sampled tokens (≤ 5e-4, fp32)."""
    model, _ = tiny_pair
    prompts = random_prompts([4, 9])
    out = generate(model, prompts, n=2, max_new_tokens=24, seed=1, slots=3, **settings)
    for prompt, samples in zip(prompts, out):
        for s in samples:
            expected = full_forward_logprobs(model, prompt, s.token_ids)
            diff = (torch.tensor(s.logprobs) - expected).abs().max().item()
            assert diff <= 5e-4, f"{settings}: max |sampler − forward| log-prob = {diff:.3g}"


def test_shared_prefill_equals_independent_runs(tiny_pair):
    model, _ = tiny_pair
    prompts = random_prompts([6, 13])
    together = generate(model, prompts, n=3, max_new_tokens=20, temperature=0)
    for b, p in enumerate(prompts):
        alone = generate(model, [p], n=1, max_new_tokens=20, temperature=0)[0][0]
        for s in together[b]:
            assert s.token_ids == alone.token_ids and s.logprobs == pytest.approx(alone.logprobs, abs=1e-5)


def test_sampling_is_seeded_per_prompt_not_per_batch(tiny_pair):
    """Same seed → same samples, even when the prompt sits in another batch; other seeds → other samples."""
    model, _ = tiny_pair
    p, q, r = random_prompts([7, 12, 4])
    kw = dict(n=3, max_new_tokens=16, temperature=1.0, seed=5)
    a = generate(model, [p, q], prompt_keys=[10, 11], **kw)
    b = generate(model, [r, q], prompt_keys=[12, 11], **kw)
    assert [s.token_ids for s in a[1]] == [s.token_ids for s in b[1]]
    assert [s.token_ids for s in a[0]] == [s.token_ids for s in generate(model, [p], prompt_keys=[10], **kw)[0]]
    assert len({tuple(s.token_ids) for s in a[0]}) == 3, "the n samples of one prompt should differ"
    other = generate(model, [p, q], prompt_keys=[10, 11], **{**kw, "seed": 6})
    assert [s.token_ids for s in other[0]] != [s.token_ids for s in a[0]]


def test_stop_tokens_end_samples_and_free_their_slot(tiny_pair, monkeypatch):
    model, _ = tiny_pair
    prompts = random_prompts([5, 8])
    free = generate(model, prompts, max_new_tokens=30, temperature=0)
    stop = free[0][0].token_ids[6]  # the 7th greedy token of prompt 0 becomes a stop token
    copies = []
    original = KVCache.copy_row
    monkeypatch.setattr(KVCache, "copy_row", lambda self, row, source: (copies.append(row), original(self, row, source))[1])
    out = generate(model, prompts, max_new_tokens=30, temperature=0, stop_token_ids=[stop], slots=1)
    first = free[0][0].token_ids.index(stop)
    assert out[0][0].token_ids == free[0][0].token_ids[:first + 1], "the stop token is kept, nothing after it"
    assert out[0][0].finish_reason == "stop"
    if stop not in free[1][0].token_ids:
        assert out[1][0].finish_reason == "length" and out[1][0].token_ids == free[1][0].token_ids
    assert copies == [0, 0], f"both samples should have taken the one slot in turn: {copies}"


def _stop_ids(vocab: int = 103, share: int = 8) -> list[int]:
    """Every share-th id: a stop with probability ~1/share at each step of a random model."""
    return list(range(3, vocab, share))


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_samples_do_not_depend_on_the_schedule(tiny_pair, slots):
    """Prompts of very different lengths (past the window of 8), stops at different steps: every sample's token ids
    are the same in continuous and static scheduling at any number of slots as with every sample decoded at
    once; log-probs agree to float noise (the same bits at the same number of slots for the dense model)."""
    model, _ = tiny_pair
    prompts = random_prompts([2, 17, 5, 30, 9, 1], seed=4)
    kw = dict(n=3, max_new_tokens=20, temperature=1.0, seed=2, stop_token_ids=_stop_ids(), prompt_keys=[7, 1, 9, 3, 5, 8])
    reference = generate(model, prompts, schedule="static", **kw)  # one batch of all 18 samples
    lengths = {len(s.token_ids) for row in reference for s in row}
    assert len(lengths) >= 4 and any(s.finish_reason == "stop" for row in reference for s in row), lengths
    for schedule in ("continuous", "static"):
        got = generate(model, prompts, slots=slots, schedule=schedule, **kw)
        for b, (want_row, got_row) in enumerate(zip(reference, got)):
            for j, (want, have) in enumerate(zip(want_row, got_row)):
                assert have.token_ids == want.token_ids, f"{schedule}, {slots} slots: prompt {b} sample {j}"
                assert have.finish_reason == want.finish_reason
                diff = max(abs(x - y) for x, y in zip(have.logprobs, want.logprobs))
                assert diff <= 1e-4, f"{schedule}, {slots} slots: prompt {b} sample {j}: max log-prob diff {diff:.3g}"
    if model.config.num_local_experts == 0:  # dense: a row's bits do not depend on its neighbours
        a = generate(model, prompts, slots=3, **kw)
        b = generate(model, prompts, slots=3, schedule="static", **kw)
        assert [[s.logprobs for s in row] for row in a] == [[s.logprobs for s in row] for row in b]


def test_a_refilled_slot_sees_nothing_of_its_last_occupant(tiny_pair):
    """A slot whose last occupant left garbage keys and values, all marked visible (position 0), decodes its new
    sample exactly as a fresh slot does: copy_row replaces keys, values and positions. (In a run the positions
    could not leak anyway — a slot is written before its position becomes visible — so the test makes the old
    entries visible to every query, and would fail if anything of them stayed.)"""
    model, _ = tiny_pair
    cfg, prompt = model.config, random_prompts([5])[0]
    size = sampling.cache_size(cfg, len(prompt), 12)

    def decode(dirty: bool) -> torch.Tensor:
        cache, stash = KVCache(cfg, 2, size, "cpu", torch.float32), KVCache(cfg, 1, size, "cpu", torch.float32)
        if dirty:
            cache.k.normal_(), cache.v.normal_(), cache.pos.zero_(), cache.length.fill_(3)
        with torch.no_grad():
            logits = [stash.prefill(model, prompt)]
            cache.copy_row(1, stash)  # row 0 keeps its occupant (decoding dummies); row 1 is refilled
            for _ in range(12):
                logits.append(sampling._decode(model, torch.stack([torch.tensor(0), logits[-1].argmax()]), cache)[1])
        return torch.stack(logits)

    clean, dirty = decode(False), decode(True)
    diff = (clean - dirty).abs().max().item()
    # Dense: the same bits. Mixtral: row 0's garbage changes which tokens each expert batches, so the last bits
    # may move; a leak moves the logits by far more (garbage keys at position 0 take a share of every softmax).
    assert diff == 0 if cfg.num_local_experts == 0 else diff <= 1e-5, f"max |difference| {diff:.3g}"


def test_a_refilled_slot_decodes_as_alone(tmp_path):
    """One slot: the long prompt's sample runs first (longest first), then the short prompt's takes its slot. It
    must decode exactly as it does alone in a fresh cache; had the old keys stayed visible, it would attend to
    the first occupant's 40 tokens too. (No window, so nothing of the old row is overwritten by the new one.)"""
    path, _ = hf_tiny_checkpoint(tmp_path, "mistral", sliding_window=None)
    model = minalign.load_model(path).eval()
    long, short = random_prompts([30, 4], seed=1)
    kw = dict(max_new_tokens=10, temperature=1.0, seed=0, prompt_keys=[0, 1])
    shared = generate(model, [long, short], slots=1, **kw)
    alone = generate(model, [short], slots=1, **{**kw, "prompt_keys": [1]})[0][0]
    after = shared[1][0]
    diff = max(abs(x - y) for x, y in zip(after.logprobs, alone.logprobs))
    assert after.token_ids == alone.token_ids and diff <= 1e-5, f"max log-prob diff {diff:.3g}"


def test_rolling_cache_is_bounded_by_the_window(tiny_pair, monkeypatch):
    model, _ = tiny_pair
    sizes = []
    original = KVCache.__init__
    monkeypatch.setattr(KVCache, "__init__", lambda self, cfg, batch, size, *a: (sizes.append(size),
                                                                               original(self, cfg, batch, size, *a))[1])
    prompt = random_prompts([20])[0]
    out = generate(model, [prompt], max_new_tokens=30, temperature=0.8, seed=3)
    assert sizes == [model.config.sliding_window] * 2  # the slots' cache and the prefill's
    diff = (torch.tensor(out[0][0].logprobs) - full_forward_logprobs(model, prompt, out[0][0].token_ids)).abs().max()
    assert diff <= 5e-4, f"rolling cache drifted from the full forward: {diff:.3g}"


def test_unwindowed_model_gets_a_full_cache(tmp_path):
    path, _ = hf_tiny_checkpoint(tmp_path, "mistral", sliding_window=None)
    model = minalign.load_model(path).eval()
    prompt = random_prompts([9])[0]
    s = generate(model, [prompt], max_new_tokens=25, temperature=1.0, seed=0)[0][0]
    diff = (torch.tensor(s.logprobs) - full_forward_logprobs(model, prompt, s.token_ids)).abs().max()
    assert diff <= 5e-4, f"{diff:.3g}"


# --- filters and draws, by hand ---------------------------------------------------------------------------------

PROBS = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # ranked: token 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)


def kept(logits):
    return sorted(torch.isfinite(logits[0]).nonzero().flatten().tolist())


def test_top_k_and_top_p_filters_by_hand():
    logits = PROBS.log()
    assert kept(filter_logits(logits, top_k=2)) == [1, 3]
    assert kept(filter_logits(logits, top_k=3)) == [1, 2, 3]
    # nucleus: a token stays iff the mass ranked above it < top_p
    assert kept(filter_logits(logits, top_p=0.5)) == [1]  # above token 3: 0.5, not < 0.5
    assert kept(filter_logits(logits, top_p=0.51)) == [1, 3]
    assert kept(filter_logits(logits, top_p=0.8)) == [1, 3]  # above token 2: 0.8
    assert kept(filter_logits(logits, top_p=0.81)) == [1, 2, 3]
    assert kept(filter_logits(logits, top_p=0.01)) == [1]  # the best token always stays
    assert kept(filter_logits(logits, top_k=3, top_p=0.6)) == [1, 3]


@pytest.mark.parametrize("top_k, top_p, expected", [
    (0, 1.0, {1: 0.5, 3: 0.3, 2: 0.15, 0: 0.05}),
    (2, 1.0, {1: 0.5 / 0.8, 3: 0.3 / 0.8}),
    (0, 0.81, {1: 0.5 / 0.95, 3: 0.3 / 0.95, 2: 0.15 / 0.95}),
    (3, 0.6, {1: 0.5 / 0.8, 3: 0.3 / 0.8}),
])
def test_draw_follows_the_filtered_distribution(top_k, top_p, expected):
    """Inverse-CDF draws over an even grid of uniforms hit each token in proportion to its probability."""
    grid = (torch.arange(10_000) + 0.5) / 10_000
    ids = draw(PROBS.log().expand(len(grid), 4), grid, temperature=1.0, top_k=top_k, top_p=top_p)
    freq = {t: (ids == t).float().mean().item() for t in range(4)}
    for t in range(4):
        assert freq[t] == pytest.approx(expected.get(t, 0.0), abs=2e-4), f"token {t}: {freq}"


def test_temperature_sharpens_by_hand():
    """T = 0.5 squares the probabilities (then renormalises): softmax(log p / 0.5) ∝ p²."""
    grid = (torch.arange(10_000) + 0.5) / 10_000
    ids = draw(PROBS.log().expand(len(grid), 4), grid, temperature=0.5, top_k=0, top_p=1.0)
    p2 = PROBS[0] ** 2 / (PROBS[0] ** 2).sum()
    for t in range(4):
        assert (ids == t).float().mean().item() == pytest.approx(p2[t].item(), abs=2e-4)


def test_stop_strings_cut_the_text(tmp_path, merlinite_tokenizer):
    tok = merlinite_tokenizer
    model = minalign.Transformer(minalign.get_config("tiny-mistral", vocab_size=tok.vocab_size)).init_weights(
        std=0.3, seed=0).eval()
    prompt = tok.encode("The quick brown fox", bos=True)
    free = generate(model, [prompt], max_new_tokens=40, temperature=0, tokenizer=tok)[0][0]
    assert free.text == tok.decode(free.token_ids)
    text = free.text
    assert len(text) > 12, f"need some text to cut: {text!r}"
    stop = text[8:11]
    cut = generate(model, [prompt], max_new_tokens=40, temperature=0, tokenizer=tok, stop_strings=[stop, "\x00"])[0][0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[:text.find(stop)], (cut.text, text, stop)
    assert cut.token_ids == free.token_ids[:len(cut.token_ids)]
    assert stop in tok.decode(cut.token_ids) and stop not in tok.decode(cut.token_ids[:-1])


def test_bad_arguments(tiny_pair):
    model, _ = tiny_pair
    for kwargs, msg in [(dict(prompts=[]), "at least one prompt"), (dict(prompts=[[]]), "at least one token"),
                        (dict(top_p=0.0), "top_p"), (dict(temperature=-1), "temperature"),
                        (dict(stop_strings=["x"]), "need a tokenizer"),
                        (dict(max_new_tokens=10_000), "exceeds the model's context")]:
        args = dict(prompts=[[5, 6]], max_new_tokens=4) | kwargs
        with pytest.raises(ValueError, match=msg):
            generate(model, args.pop("prompts"), **args)
    assert sampling.Sample([1], [0.0], "stop").text is None


def test_compiled_decode_matches_eager(tmp_path):
    """torch.compile'd decode steps (fixed shapes: finished rows stay in the batch) give the eager results."""
    path, _ = hf_tiny_checkpoint(tmp_path, "mistral")
    model = minalign.load_model(path).eval()
    prompts = random_prompts([5, 9, 3])
    eager = generate(model, prompts, max_new_tokens=12, temperature=0)
    stop = eager[1][0].token_ids[3]  # makes row 1 finish early, exercising a dead row in the fixed batch
    kw = dict(max_new_tokens=12, temperature=0, stop_token_ids=[stop])
    expected = generate(model, prompts, **kw)
    compiled = generate(model, prompts, compile=True, **kw)
    assert expected[1][0].finish_reason == "stop" and len(expected[1][0].token_ids) <= 4
    for e, c in zip(expected, compiled):
        assert e[0].token_ids == c[0].token_ids and e[0].finish_reason == c[0].finish_reason
        assert e[0].logprobs == pytest.approx(c[0].logprobs, abs=1e-4)


def test_padding_rows_past_the_tokenizer_are_never_drawn(merlinite_tokenizer):
    """Rows past the tokenizer's vocabulary (a padded embedding) are never drawn, even when they are likely;
    log-probs stay normalised over all rows."""
    tok = merlinite_tokenizer
    model = minalign.Transformer(minalign.get_config("tiny-mistral", vocab_size=tok.vocab_size + 3)).init_weights(
        std=0.3, seed=0).eval()
    with torch.no_grad():
        model.lm_head.weight[tok.vocab_size:] = model.lm_head.weight[5] * 3  # padding rows outscore a real token
    prompt = tok.encode("The quick brown fox", bos=True)
    unmasked = generate(model, [prompt], n=4, max_new_tokens=10, temperature=1.0, seed=0)
    assert any(i >= tok.vocab_size for s in unmasked[0] for i in s.token_ids), "the test needs likely padding rows"
    out = generate(model, [prompt], n=4, max_new_tokens=10, temperature=1.0, seed=0, tokenizer=tok)
    for s in out[0]:
        assert max(s.token_ids) < tok.vocab_size, s.token_ids
        diff = (torch.tensor(s.logprobs) - full_forward_logprobs(model, prompt, s.token_ids)).abs().max()
        assert diff <= 5e-4


def test_a_special_token_can_be_a_stop_string(merlinite_tokenizer):
    """"<|user|>" as a stop string: the special token is seen, the sample stops there, the text is cut."""
    tok = merlinite_tokenizer
    model = minalign.Transformer(minalign.get_config("tiny-mistral", vocab_size=tok.vocab_size)).init_weights(
        std=0.3, seed=0).eval()
    user = tok.token_to_id("<|user|>")
    with torch.no_grad():
        model.lm_head.weight[user] = model.lm_head.weight[user] * 0 + model.lm_head.weight.mean(0) * 40
    prompt = tok.encode("The quick brown fox", bos=True)
    free = generate(model, [prompt], n=6, max_new_tokens=30, temperature=1.5, seed=0, tokenizer=tok)[0]
    assert any(user in s.token_ids for s in free), "the test needs <|user|> to be sampled"
    out = generate(model, [prompt], n=6, max_new_tokens=30, temperature=1.5, seed=0, tokenizer=tok,
                   stop_strings=["<|user|>"])[0]
    for f, s in zip(free, out):
        if user in f.token_ids:
            k = f.token_ids.index(user)
            assert s.token_ids == f.token_ids[:k + 1] and s.finish_reason == "stop"
            assert s.text == tok.decode(f.token_ids[:k]), (s.text, tok.decode(f.token_ids[:k]))


def test_a_uniform_next_to_one_never_draws_a_filtered_token():
    """u = 1 − 1e-9 rounds to 1 in float32; the draw must still land on a token the filter kept."""
    logits = torch.tensor([[5.0, 4.0, 0.0, -30.0, -30.0]])
    u = torch.tensor([1 - 1e-9], dtype=torch.float64)
    assert draw(logits, u, 1.0, 0, 0.5).item() == 0  # top-p 0.5 keeps only token 0
    assert draw(logits, u, 1.0, 0, 1.0).item() in (0, 1, 2)  # tokens 3, 4 have probability ~1e-16
