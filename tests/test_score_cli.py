"""score.py end to end on a samples file made by sample.py: the output rows, resume after a kill (between the two
models' passes and within one), bad input, and torchrun with two CPU processes — plain and with FSDP — giving
the very file one process gives.

The samples come from a tiny Merlinite-like sampler (its tokenizer has <|endoftext|> = 400); the policy (a tiny
Mixtral) and the reference (a tiny Mistral) share that tokenizer. A second pair has the plain Mistral tokenizer
(400 ids), as Mixtral's has no <|endoftext|>: those scorers need --sampler-end-ids 400.
"""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import minalign
import sample as sample_cli
import score as score_cli
from minalign import score
from minalign import logratio
from minalign.logratio import LogRatioReward
from tests.test_sample_cli import ENV, PROMPTS, ROOT, assert_same_file, read_rows, tiny_checkpoint, torchrun, write_prompts
from tests.test_sample_cli import args_for as sample_args
from tests.test_sample_cli import one_thread  # noqa: F401 (autouse: one torch thread, as in the subprocesses)

BATCH_TOKENS = 200  # several forwards for 21 responses, so ranks, resumes and FSDP's lockstep have work to share


def scorer_pair(tmp_path_factory, tokenizer_dir: Path, seed: int) -> tuple[Path, Path]:
    """(policy, reference): a random tiny Mixtral and a random tiny Mistral with the tokenizer of tokenizer_dir."""
    dirs = []
    for kind, k in (("mixtral", seed), ("mistral", seed + 1)):
        d = tmp_path_factory.mktemp(f"{kind}{k}")
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, d / f.name)
        cfg = minalign.get_config(f"tiny-{kind}", vocab_size=minalign.load_tokenizer(d).vocab_size)
        minalign.save_model(minalign.Transformer(cfg).init_weights(seed=k, std=0.05), d)
        dirs.append(d)
    return tuple(dirs)


@pytest.fixture(scope="module")
def models(tmp_path_factory, merlinite_tokenizer_dir):
    """(policy, reference) sharing the sampler's tokenizer."""
    return scorer_pair(tmp_path_factory, merlinite_tokenizer_dir, 1)


@pytest.fixture(scope="module")
def mistral_models(tmp_path_factory, mistral_tokenizer_dir):
    """A policy/reference pair with the plain Mistral tokenizer: no <|endoftext|>, as in Mixtral."""
    return scorer_pair(tmp_path_factory, mistral_tokenizer_dir, 3)


@pytest.fixture(scope="module")
def samples(tmp_path_factory, merlinite_tokenizer_dir):
    """A samples file written by sample.py: 6 prompts x 3 responses of up to 12 tokens, some ending in EOS."""
    d = tmp_path_factory.mktemp("samples")
    sampler = tiny_checkpoint(tmp_path_factory.mktemp("sampler"), merlinite_tokenizer_dir, padding_logit=-16)
    prompts = write_prompts(d / "prompts.jsonl", PROMPTS)
    assert sample_cli.main(sample_args(sampler, prompts, d / "samples.jsonl")) == 0
    return d / "samples.jsonl"


def args_for(models, samples, out, *extra, **flags) -> list[str]:
    policy, reference = models
    argv = ["--samples", str(samples), "--policy", str(policy), "--reference", str(reference), "--out", str(out)]
    for k, v in {"batch_tokens": BATCH_TOKENS, "policy_template": "mistral", "reference_template": "raw",
                 **flags}.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv + list(extra)


def run_main(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = score_cli.main(argv)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def reference_run(models, samples, tmp_path_factory):
    """Output bytes of one uninterrupted single-process run, shared by the comparisons."""
    out = tmp_path_factory.mktemp("reference_run") / "scores.jsonl"
    assert score_cli.main(args_for(models, samples, out)) == 0
    return out.read_bytes()


def test_output_rows(models, samples, reference_run, tmp_path):
    rows, given = [json.loads(line) for line in reference_run.decode().splitlines()], read_rows(samples)
    assert len(rows) == len(given) == 7
    for row, g in zip(rows, given):
        assert list(row) == list(g) and {k: v for k, v in row.items() if k != "responses"} == \
            {k: v for k, v in g.items() if k != "responses"}
        for r, s in zip(row["responses"], g["responses"], strict=True):
            assert list(r) == [*s, "reward", "policy_logprob", "reference_logprob", "num_tokens"]
            assert {k: r[k] for k in s} == s
            assert r["num_tokens"] == len(s["token_ids"])
            assert r["reward"] == r["policy_logprob"] - r["reference_logprob"]
            assert r["policy_logprob"] < 0 and r["reference_logprob"] < 0
    # The same numbers as the library's reward source (the same forwards, so to the bit).
    want = LogRatioReward(*models, policy_template="mistral", reference_template="raw", batch_tokens=BATCH_TOKENS).score(given)
    assert rows == want


def test_mean_beta_and_reference_free(models, samples, reference_run, tmp_path, capsys):
    plain = [json.loads(line) for line in reference_run.decode().splitlines()]
    out = tmp_path / "mean.jsonl"
    code, err = run_main(args_for(models, samples, out, normalize="mean", beta=0.5), capsys)
    assert code == 0, err
    for row, p in zip(read_rows(out), plain):
        for r, q in zip(row["responses"], p["responses"]):
            assert r["reward"] == pytest.approx(0.5 * q["reward"] / q["num_tokens"], rel=1e-12)
    assert (f"score.py: policy {models[0]} reads prompts in the 'mistral' template; reference {models[1]} reads "
            f"prompts in the 'raw' template\n") in err, err
    summary = err.splitlines()[-1]
    assert summary.startswith("score.py: rows 7, responses 21, tokens ") and ", mean reward " in summary, err
    assert summary.endswith(f"tokens/s -> {out}"), summary

    out = tmp_path / "free.jsonl"
    argv = args_for(models, samples, out, "--reference-free")
    for flag in ("--reference", "--reference-template"):
        argv[argv.index(flag):argv.index(flag) + 2] = []
    code, err = run_main(argv, capsys)
    assert code == 0, err
    for row, p in zip(read_rows(out), plain):
        for r, q in zip(row["responses"], p["responses"]):
            assert "reference_logprob" not in r and r["reward"] == r["policy_logprob"] == q["policy_logprob"]


def test_resume_after_a_kill_between_the_passes(models, samples, reference_run, tmp_path, capsys, monkeypatch):
    """Ctrl-C as the reference is being loaded: the policy's log-probs are kept, and the resumed run loads only
    the reference and writes the uninterrupted file."""
    out, partial = tmp_path / "scores.jsonl", tmp_path / "scores.jsonl.partial"
    real, loaded = logratio.load_scorer_model, []

    def load_model(scorer, *args):
        loaded.append(scorer.path)
        if scorer.path == models[1] and len(loaded) == 2:  # the first run, at its second model
            raise KeyboardInterrupt
        return real(scorer, *args)

    monkeypatch.setattr(logratio, "load_scorer_model", load_model)
    code, err = run_main(args_for(models, samples, out), capsys)
    assert code == 130 and "rerun with --resume" in err, err
    assert not out.exists()
    lines = [json.loads(line) for line in partial.read_text().splitlines()]
    assert lines[0]["format"] == score.PARTIAL_FORMAT and lines[0]["settings"]["policy_template"] == "mistral"
    assert {e["pass"] for e in lines[1:]} == {"policy"} and sum(len(e["logprobs"]) for e in lines[1:]) == 21

    code, err = run_main(args_for(models, samples, out), capsys)  # without --resume: refused
    assert code == 2 and "pass --resume" in err and err.count("\n") == 1, err
    code, err = run_main(args_for(models, samples, out, "--resume"), capsys)
    assert code == 0 and "resuming: 21 of 42 response log-probs are done" in err, err
    assert loaded == [models[0], models[1], models[1]]  # the policy was not loaded again
    assert_same_file(out.read_bytes(), reference_run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.jsonl"]


def test_resume_within_a_pass_with_a_torn_line(models, samples, reference_run, tmp_path, capsys, monkeypatch):
    out, partial = tmp_path / "scores.jsonl", tmp_path / "scores.jsonl.partial"
    real, calls = logratio.batch_logprobs, [0]

    def batch_logprobs(*args):
        calls[0] += 1
        if calls[0] > 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(logratio, "batch_logprobs", batch_logprobs)
    assert run_main(args_for(models, samples, out), capsys)[0] == 130
    monkeypatch.undo()
    lines = partial.read_bytes().splitlines(keepends=True)
    assert len(lines) == 1 + 3, lines
    partial.write_bytes(b"".join(lines[:3]) + lines[3][:30])  # killed while writing the third forward
    # Other --batch-tokens, --beta and --normalize may resume: the sums are kept by response, rewards made at the end.
    code, err = run_main(args_for(models, samples, out, "--resume", batch_tokens=64, beta=2), capsys)
    assert code == 0 and "resuming: " in err, err
    for row, want in zip(read_rows(out), [json.loads(line) for line in reference_run.decode().splitlines()]):
        for r, w in zip(row["responses"], want["responses"]):
            assert r["policy_logprob"] == pytest.approx(w["policy_logprob"], abs=1e-4)
            assert r["reward"] == pytest.approx(2 * w["reward"], abs=1e-3)

    # Settings that change the sums are refused.
    assert run_main(args_for(models, samples, out, "--overwrite", policy_template="raw"), capsys)[0] == 0
    monkeypatch.setattr(logratio, "batch_logprobs", batch_logprobs)
    calls[0] = 0
    assert run_main(args_for(models, samples, tmp_path / "b.jsonl"), capsys)[0] == 130
    monkeypatch.undo()
    code, err = run_main(args_for(models, samples, tmp_path / "b.jsonl", "--resume", policy_template="raw"), capsys)
    assert code == 2 and "policy_template 'mistral' then, 'raw' now" in err and err.count("\n") == 1, err


def bad_samples(path: Path, samples: Path, bad: str) -> Path:
    """The samples file with its second row replaced by bad."""
    lines = samples.read_text().splitlines()
    path.write_text("\n".join([lines[0], bad, *lines[2:]]) + "\n")
    return path


@pytest.mark.parametrize("bad, phrase", [
    ('{"prompt": "x"', "malformed JSON"),
    ('{"id": 2, "responses": [{"token_ids": [5]}]}', 'a samples row needs a "prompt"'),
    ('{"prompt": "x", "responses": 7}', 'needs a non-empty "responses" list'),
    ('{"prompt": "x", "responses": [{"text": "y"}]}', 'responses[0] needs "token_ids"'),
    ('{"prompt": "x", "responses": [{"token_ids": [5, 4000]}]}', "token id 4000 is outside the tokenizer of"),
    ('{"prompt": "x", "responses": [{"token_ids": [5, -1, 7]}]}', "token id -1 is outside"),
    ('{"prompt": "x", "responses": [{"token_ids": ' + json.dumps([5] * 1020) + '}]}',
     "response tokens exceed the context of 1024 of"),
    ('{"prompt": [{"role": "assistant", "content": "x"}], "responses": [{"token_ids": [5]}]}', "expected 'user'"),
])
def test_bad_rows_name_their_line(models, samples, tmp_path, capsys, bad, phrase):
    path = bad_samples(tmp_path / "bad.jsonl", samples, bad)
    code, err = run_main(args_for(models, path, tmp_path / "out.jsonl"), capsys)
    assert code == 2, err
    assert err.startswith(f"score.py: error: {path}:2: ") and phrase in err, err
    assert err.count("\n") == 1, err
    assert not list(tmp_path.glob("out.jsonl*"))


def test_skip_invalid(models, samples, tmp_path, capsys):
    path = bad_samples(tmp_path / "bad.jsonl", samples, '{"prompt": "x", "responses": [{"token_ids": [4000]}]}')
    code, err = run_main(args_for(models, path, tmp_path / "out.jsonl", "--skip-invalid"), capsys)
    assert code == 0, err
    assert [line for line in err.splitlines() if "skipped" in line and "error" not in line][0].startswith(
        f"score.py: skipped {path}:2: ")
    assert [r["id"] for r in read_rows(tmp_path / "out.jsonl")] == [1, 3, 40, 5, 6, 7]
    assert "score.py: rows 6, responses 18," in err and ", skipped 1 -> " in err, err


def test_sampler_end_ids(mistral_models, samples, tmp_path, capsys):
    """Merlinite-made samples end in <|endoftext|> (400), outside Mixtral's vocabulary: refused with a hint, and
    with --sampler-end-ids 400 scored as ending with </s>."""
    # The tiny sampler also drew other added tokens (<|user|>, ...): make those plain ids, keep the ends.
    rows = [{**row, "responses": [{**r, "token_ids": [5 if i > 400 else i for i in r["token_ids"]]}
                                  for r in row["responses"]]} for row in read_rows(samples)]
    samples = write_prompts(tmp_path / "samples.jsonl", rows)
    out = tmp_path / "out.jsonl"
    code, err = run_main(args_for(mistral_models, samples, out), capsys)
    assert code == 2 and "token id 400 is outside the tokenizer of" in err and "sampler end id" in err, err
    code, err = run_main(args_for(mistral_models, samples, out, "--sampler-end-ids", "400"), capsys)
    assert code == 0, err
    rows = read_rows(out)
    assert any(r["token_ids"][-1] == 400 for row in rows for r in row["responses"])  # the rows keep what was sampled
    swapped = [{**row, "responses": [{**r, "token_ids": r["token_ids"][:-1] + [2] if r["token_ids"][-1] == 400
                                      else r["token_ids"]} for r in row["responses"]]} for row in read_rows(samples)]
    want = LogRatioReward(*mistral_models, policy_template="mistral", reference_template="raw", batch_tokens=BATCH_TOKENS).score(swapped)
    assert [[r["reward"] for r in row["responses"]] for row in rows] == \
        [[r["reward"] for r in row["responses"]] for row in want]


def test_model_problems(models, mistral_models, samples, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    policy, reference = models
    cases = [
        (args_for((policy, mistral_models[1]), samples, out),
         f"the policy {policy} and the reference {mistral_models[1]} must share a tokenizer"),
        (args_for(mistral_models, samples, out, policy_template="merlinite"),
         f"{mistral_models[0]}: chat template 'merlinite' needs token(s)"),
        (args_for((tmp_path / "nope", reference), samples, out), f"--policy {tmp_path / 'nope'}: no such directory"),
        (args_for(models, tmp_path / "nope.jsonl", out), f"--samples {tmp_path / 'nope.jsonl'}: no such file"),
        (args_for(models, samples, tmp_path / "no" / "out.jsonl"), f"directory {tmp_path / 'no'} does not exist"),
        (args_for(models, samples, out, "--fsdp"), "--fsdp shards each model over torchrun's processes"),
    ]
    for argv, phrase in cases:
        code, err = run_main(argv, capsys)
        assert code == 2 and phrase in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_non_finite_log_prob_is_an_error(models, samples, tmp_path, capsys, monkeypatch):
    real = logratio.batch_logprobs
    monkeypatch.setattr(logratio, "batch_logprobs", lambda *a: [v if k else float("nan") for k, v in enumerate(real(*a))])
    code, err = run_main(args_for(models, samples, tmp_path / "out.jsonl"), capsys)
    assert code == 2 and f"{samples}:" in err and "the policy gives responses[" in err and "a log-prob of nan" in err, err
    assert err.count("\n") == 2 and err.startswith("score.py: policy "), err  # the start-up line, the error


def rows_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_reward_spec_scores_with_any_source(samples, tmp_path, capsys):
    """--reward SPEC: a user's function scores every row (what the loop runs for kind = "python"); a function
    that raises, or answers in the wrong shape, is one line and status 2, the samples untouched."""
    fn = tmp_path / "rewards.py"
    fn.write_text("def length(rows):\n    return [[len(r['token_ids']) for r in row['responses']] for row in rows]\n"
                  "def broken(rows):\n    raise ValueError('no score for you')\n"
                  "def short(rows):\n    return [[1.0] for row in rows]\n")
    out = tmp_path / "scores.jsonl"
    code, err = run_main(["--samples", str(samples), "--out", str(out), "--reward", f"{fn}:length"], capsys)
    assert code == 0 and err.startswith(f"score.py: rows {len(rows_of(samples))}, responses ") and str(out) in err, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["reward"] == len(r["token_ids"]) for row in rows for r in row["responses"])
    for name, phrase in [("broken", "no score for you"), ("short", "responses but got [1.0]")]:
        code, err = run_main(["--samples", str(samples), "--out", str(tmp_path / f"{name}.jsonl"), "--reward",
                              f"{fn}:{name}"], capsys)
        assert code == 2 and phrase in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not (tmp_path / f"{name}.jsonl").exists()


@pytest.mark.parametrize("change, phrase", [
    (("--policy-template", "chatml"), "argument --policy-template: invalid choice: 'chatml'"),
    (("--normalize", "max"), "argument --normalize: invalid choice: 'max'"),
    (("--reference-free",), "give --reference DIR, or --reference-free, not both"),
    (("--batch-tokens", "0"), "--batch-tokens 0 is out of range"),
    (("-policy-template",), "the following arguments are required: --policy-template"),
    (("-reference-template",), "the following arguments are required: --reference-template"),
])
def test_bad_flags(models, samples, tmp_path, capsys, change, phrase):
    """A "-flag" change removes that flag and its value: templates have no default (a wrong one gives no error)."""
    argv = args_for(models, samples, tmp_path / "out.jsonl")
    if change[0].startswith("-") and not change[0].startswith("--"):
        at = argv.index("-" + change[0])
        argv[at:at + 2], change = [], ()
    code = score_cli.main(argv + list(change))
    err = capsys.readouterr().err
    assert code == 2 and phrase in err and err.count("\n") == 1, err


def test_command_line_bad_row(models, samples, tmp_path):
    path = bad_samples(tmp_path / "bad.jsonl", samples, "{nope")
    run = subprocess.run([sys.executable, "score.py", *args_for(models, path, tmp_path / "o.jsonl")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [f"score.py: error: {path}:2: malformed JSON (Expecting property name "
                                       f"enclosed in double quotes at column 2) (--skip-invalid skips bad rows)"]


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_torchrun_two_processes_write_the_single_process_file(models, samples, reference_run, tmp_path, fsdp):
    """Under --fsdp the 5 forwards of the reference pass are dealt 3 and 2: rank 1 runs one dummy forward."""
    out = tmp_path / "scores.jsonl"
    argv = args_for(models, samples, out, "--device", "cpu", *(["--fsdp"] if fsdp else []))
    summary = torchrun("score.py", argv, out, reference_run)
    assert len(summary) == 1 and summary[0].startswith("score.py: rows 7, responses 21, tokens "), summary


def test_token_logprobs_are_the_terms_of_the_sums(models, samples, reference_run, tmp_path, capsys, monkeypatch):
    """--token-logprobs: each response's per-token log-probs of both models, from the same forwards, sum to its
    policy_logprob and reference_logprob; the rewards are those of a run without them. A kill between the passes
    resumes with the terms kept in the partial file; a resume that changes the flag is refused."""
    out = tmp_path / "scores.jsonl"
    real, loaded = logratio.load_scorer_model, []

    def load_model(scorer, *args):
        loaded.append(scorer.path)
        if len(loaded) == 2:  # the first run, at its second model
            raise KeyboardInterrupt
        return real(scorer, *args)

    monkeypatch.setattr(logratio, "load_scorer_model", load_model)
    assert run_main(args_for(models, samples, out, "--token-logprobs"), capsys)[0] == 130
    monkeypatch.undo()
    code, err = run_main(args_for(models, samples, out, "--resume"), capsys)
    assert code == 2 and "token_logprobs True then, None now" in err, err
    code, err = run_main(args_for(models, samples, out, "--token-logprobs", "--resume"), capsys)
    assert code == 0 and "resuming: 21 of 42" in err, err
    worst = 0.0
    for row, want in zip(read_rows(out), [json.loads(line) for line in reference_run.decode().splitlines()]):
        for r, w in zip(row["responses"], want["responses"]):
            assert len(r["policy_token_logprobs"]) == len(r["reference_token_logprobs"]) == r["num_tokens"]
            worst = max(worst, abs(math.fsum(r["policy_token_logprobs"]) - r["policy_logprob"]),
                        abs(math.fsum(r["reference_token_logprobs"]) - r["reference_logprob"]))
            assert r["reward"] == w["reward"] and r["policy_logprob"] == w["policy_logprob"]
    assert worst < 1e-4, f"the per-token terms do not add up to the sums: max difference {worst}"
