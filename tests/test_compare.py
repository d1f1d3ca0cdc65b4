"""The comparison of two samples files (minalign/compare.py, score.py's compare mode): the win rate, AlpacaEval
2.0's length-controlled win rate against synthetic judges whose bias is known, bootstrap coverage, the PairRM
judge's two orders, and bad input."""
import json
import math
import random

import numpy as np
import pytest
import torch

import score as score_cli
from minalign.compare import compare, fit_length_glm, win_rates
from minalign.errors import MinalignError
from minalign.pairrm import load_pairrm
from tests.test_pairrm import _hf_dir, _random_pairrm, deberta_tok_dir, sp_models, tiny_cfg  # noqa: F401 (fixtures)

JUDGES = '''
def longer(items):  # a judge that only counts characters
    return [1.0 if len(i["candidate"]) > len(i["baseline"]) else 0.0 if len(i["candidate"]) < len(i["baseline"])
            else 0.5 for i in items]

def right(items):  # a judge that only checks the answer
    return [0.5 + (i["candidate"].startswith("right") - i["baseline"].startswith("right")) / 2 for i in items]

def right_reward(rows):  # the same as a reward source: Bradley-Terry on it
    return [[3.0 * r["text"].startswith("right") for r in row["responses"]] for row in rows]

def too_few(items):
    return [0.5]

def not_a_probability(items):
    return [1.5 for _ in items]
'''


def write_samples(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def side(rng, prompts, n, p_right, pad):
    """Samples rows: n responses a prompt, "right ..." with chance p_right, padded with 0..pad characters."""
    return [{"id": i, "prompt": f"question {i}?",
             "responses": [{"text": ("right" if rng.random() < p_right else "wrong") + " " + "x" * rng.randint(0, pad),
                            "token_ids": [5, 6], "finish_reason": "stop", "reward": rng.gauss(0, 1)}
                           for _ in range(n)]} for i in range(prompts)]


@pytest.fixture
def judges(tmp_path, monkeypatch):
    (tmp_path / "judges.py").write_text(JUDGES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "judges"


@pytest.fixture
def files(tmp_path):
    """The same quality on both sides; the candidate's answers are 0-60 characters longer, the baseline's 0-30."""
    rng = random.Random(0)
    return (write_samples(tmp_path / "cand.jsonl", side(rng, 300, 2, 0.5, 60)),
            write_samples(tmp_path / "base.jsonl", side(rng, 300, 2, 0.5, 30)))


def test_a_judge_of_length_alone_is_controlled_for(files, judges):
    """A judge that prefers the longer answer, on answers of equal quality: the raw win rate is far from 0.5 (the
    candidate is longer), the length-controlled one near it."""
    r = compare(*files, f"pairwise:{judges}:longer")
    assert r["win_rate"] > 0.68, r["win_rate"]
    assert abs(r["lc_win_rate"] - 0.5) < 0.04, r["lc_win_rate"]
    assert r["length_coef"] > 5
    assert r["candidate_length"] > r["baseline_length"] + 10
    assert r["prompts"] == 300 and r["comparisons"] == 600 and len(r["per_prompt"]) == 300


@pytest.mark.parametrize("judge", ["pairwise:{}:right", "{}:right_reward"])
def test_a_judge_of_quality_alone_agrees_with_its_length_control(tmp_path, judges, judge):
    """A judge that checks the answer only (as a pairwise function, and as a reward source through Bradley-Terry),
    the candidate right more often and longer: the raw and the length-controlled win rates agree."""
    rng = random.Random(1)
    cand = write_samples(tmp_path / "c.jsonl", side(rng, 300, 2, 0.7, 60))
    base = write_samples(tmp_path / "b.jsonl", side(rng, 300, 2, 0.4, 30))
    r = compare(cand, base, judge.format(judges))
    assert r["win_rate"] > 0.6
    assert abs(r["lc_win_rate"] - r["win_rate"]) < 0.03, (r["win_rate"], r["lc_win_rate"])
    lo, hi = r["win_rate_interval"]
    assert lo < r["win_rate"] < hi


def test_the_win_rate_by_hand(tmp_path, judges):
    """W = the mean over prompts of each prompt's mean P, ties counting half; swapping the files gives 1 − W."""
    base = [{"id": k, "prompt": f"q{k}", "responses": [{"text": "right"}, {"text": "wrong"}]} for k in range(3)]
    cand = [{"id": 0, "prompt": "q0", "responses": [{"text": "right"}, {"text": "right"}]},  # P 0.5, 1
            {"id": 1, "prompt": "q1", "responses": [{"text": "wrong"}, {"text": "wrong"}]},  # P 0, 0.5
            {"id": 2, "prompt": "q2", "responses": [{"text": "right"}, {"text": "wrong"}]}]  # P 0.5, 0.5
    c, b = write_samples(tmp_path / "c.jsonl", cand), write_samples(tmp_path / "b.jsonl", base)
    r = compare(c, b, f"pairwise:{judges}:right")
    assert [p["preferences"] for p in r["per_prompt"]] == [[0.5, 1.0], [0.0, 0.5], [0.5, 0.5]]
    assert r["win_rate"] == pytest.approx((0.75 + 0.25 + 0.5) / 3)
    assert r["lc_win_rate"] == pytest.approx(r["win_rate"], abs=1e-6)  # every length equal: no length term
    assert r["length_coef"] is None
    swapped = compare(b, c, f"pairwise:{judges}:right")
    assert swapped["win_rate"] == pytest.approx(1 - r["win_rate"])


def test_glm_fit_recovers_its_parameters():
    """Soft targets made by the GLM itself are fitted back to its θ and φ; every fit of a batch is independent."""
    rng = np.random.default_rng(0)
    x = np.tanh(rng.normal(size=2000))
    p = 1 / (1 + np.exp(-(0.4 + 1.5 * x)))
    theta, phi = fit_length_glm(p, x, np.vstack([np.ones(2000), np.r_[np.ones(1000), np.zeros(1000)]]))
    assert theta[0] == pytest.approx(0.4, abs=1e-3) and phi[0] == pytest.approx(1.5, abs=1e-3)
    half = fit_length_glm(p[:1000], x[:1000], np.ones((1, 1000)))
    assert theta[1] == pytest.approx(half[0][0], abs=1e-9) and phi[1] == pytest.approx(half[1][0], abs=1e-9)


def test_bootstrap_intervals_cover_the_truth_at_their_nominal_rate():
    """On 300 simulated comparisons of 60 prompts (each won with chance 0.6, two pairs a prompt, lengths unrelated
    to the outcome), the 95% intervals of the win rate and of the length-controlled one hold 0.6 about 95% of the
    time."""
    rng = np.random.default_rng(0)
    trials, hits, lc_hits = 300, 0, 0
    for t in range(trials):
        prefs = rng.binomial(1, 0.6, size=(60, 2)).astype(float).tolist()
        deltas = rng.normal(0, 50, size=(60, 2)).tolist()
        r = win_rates(prefs, deltas, bootstrap=400, seed=t)
        hits += r["win_rate_interval"][0] <= 0.6 <= r["win_rate_interval"][1]
        lc_hits += r["lc_win_rate_interval"][0] <= 0.6 <= r["lc_win_rate_interval"][1]
    assert 0.90 <= hits / trials <= 0.99, hits / trials
    assert 0.88 <= lc_hits / trials <= 0.99, lc_hits / trials


def test_the_rewards_judge_reads_score_files(files):
    """--judge rewards: Bradley-Terry on the "reward" the rows carry: P = σ(r_c − r_b)."""
    r = compare(*files, "rewards")
    cand = [json.loads(line) for line in files[0].read_text().splitlines()]
    base = [json.loads(line) for line in files[1].read_text().splitlines()]
    want = [1 / (1 + math.exp(-(c["reward"] - b["reward"]))) for x, y in zip(cand, base)
            for c, b in zip(x["responses"], y["responses"])]
    got = [p for row in r["per_prompt"] for p in row["preferences"]]
    assert got == pytest.approx(want, abs=1e-12)


def test_pairrm_judges_both_orders(tmp_path, deberta_tok_dir, tiny_cfg):
    """PairRM: P = σ((m(x, c, b) − m(x, b, c)) / 2) from the model's logit in both orders; swapping the files gives
    1 − P for every pair, and 1 − the win rate."""
    d = _hf_dir(tmp_path, deberta_tok_dir, _random_pairrm(tiny_cfg))
    rng = random.Random(2)
    cand = write_samples(tmp_path / "c.jsonl", side(rng, 6, 2, 0.5, 8))
    base = write_samples(tmp_path / "b.jsonl", side(rng, 6, 2, 0.5, 8))
    r = compare(cand, base, f"pairrm:{d}")
    ranker = load_pairrm(d)
    rows = zip([json.loads(x) for x in cand.read_text().splitlines()],
               [json.loads(x) for x in base.read_text().splitlines()])
    want = []
    for c, b in rows:
        for rc, rb in zip(c["responses"], b["responses"]):
            first, second = ranker.compare(c["prompt"], rc["text"], rb["text"]), ranker.compare(c["prompt"], rb["text"],
                                                                                                 rc["text"])
            assert first != pytest.approx(-second)  # a random PairRM has a position bias: the orders differ
            want.append(float(torch.sigmoid(torch.tensor((first - second) / 2))))
    got = [p for row in r["per_prompt"] for p in row["preferences"]]
    assert got == pytest.approx(want, abs=1e-6)
    swapped = compare(base, cand, f"pairrm:{d}")
    assert [p for row in swapped["per_prompt"] for p in row["preferences"]] == pytest.approx([1 - p for p in got],
                                                                                            abs=1e-6)
    assert swapped["win_rate"] == pytest.approx(1 - r["win_rate"], abs=1e-6)


def three_rows():
    """Three prompts of two responses each, the same on both sides."""
    return [{"id": k, "prompt": f"q{k}", "responses": [{"text": "a"}, {"text": "bb"}]} for k in range(3)]


def run_main(argv, capsys):
    code = score_cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_compare_mode_of_score_py(files, judges, tmp_path, capsys):
    """score.py --candidate --baseline --judge --out: the JSON compare() returns, one summary line; a finished
    --out is refused (kept with --resume, redone with --overwrite)."""
    out = tmp_path / "cmp.json"
    argv = ["--candidate", files[0], "--baseline", files[1], "--judge", f"pairwise:{judges}:longer", "--out", out]
    code, err = run_main(argv, capsys)
    assert code == 0, err
    got = json.loads(out.read_text())
    assert got == json.loads(json.dumps(compare(*files, f"pairwise:{judges}:longer")))
    assert f"300 prompts, 600 comparisons: win rate {got['win_rate']:.3f}" in err and err.count("\n") == 1, err
    code, err = run_main(argv, capsys)
    assert code == 2 and "exists (a finished run)" in err
    assert run_main(argv + ["--resume"], capsys)[0] == 0 and json.loads(out.read_text()) == got
    code, err = run_main(argv + ["--overwrite", "--bootstrap", "50"], capsys)
    assert code == 0 and json.loads(out.read_text())["bootstrap"] == 50


def test_help_of_compare_mode(capsys):
    with pytest.raises(SystemExit) as e:
        score_cli.main(["--candidate", "x", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--baseline" in text and "--judge SPEC" in text and "pairwise:module:function" in text


@pytest.mark.parametrize("case, phrase", [
    ("missing", "cand.jsonl:3: id 2 is not in --baseline"),
    ("extra", "base.jsonl:4: id 99 is not in --candidate"),
    ("prompt", "base.jsonl:1: id 0: its prompt is not the one on line 1 of --candidate"),
    ("count", "base.jsonl:2: id 1 has 1 responses, line 2 of --candidate 2"),
    ("json", "base.jsonl:2: "),
    ("duplicate", "cand.jsonl:4: id 0 is on line 1 already"),
    ("list id", 'cand.jsonl:2: a samples row needs an "id", a string or an integer; got [1]'),
])
def test_bad_files_are_one_line_naming_file_and_line(tmp_path, judges, capsys, case, phrase):
    rows = three_rows()
    cand, base = [dict(r) for r in rows], [dict(r) for r in rows]
    if case == "missing":
        base = base[:2]
    elif case == "extra":
        base.append({"id": 99, "prompt": "q", "responses": [{"text": "a"}, {"text": "b"}]})
    elif case == "prompt":
        base[0]["prompt"] = "another"
    elif case == "count":
        base[1]["responses"] = base[1]["responses"][:1]
    elif case == "duplicate":
        cand.append(dict(cand[0]))
    elif case == "list id":
        cand[1]["id"] = [1]
    c, b = write_samples(tmp_path / "cand.jsonl", cand), write_samples(tmp_path / "base.jsonl", base)
    if case == "json":
        lines = b.read_text().splitlines()
        b.write_text("\n".join([lines[0], "{not json", *lines[2:]]) + "\n")
    out = tmp_path / "o.json"
    argv = ["--candidate", c, "--baseline", b, "--judge", f"pairwise:{judges}:right", "--out", out]
    code, err = run_main(argv, capsys)
    assert code == 2 and phrase in err and err.count("\n") == 1, err
    assert not out.exists()
    code, err = run_main(argv + ["--skip-invalid"], capsys)  # the prompt at fault left out, and said
    assert code == 0 and "score.py: skipped " in err, err
    r = json.loads(out.read_text())
    assert r["skipped"] and r["prompts"] == (3 if case in ("extra", "duplicate") else 2)


def test_a_prompt_as_text_or_as_one_message_is_the_same_prompt(tmp_path, judges):
    """The two files may write a prompt either way (sample.py keeps what the prompts file had); numpy's floats are
    probabilities too; bootstrap must be at least 1."""
    cand = [{"id": "a", "prompt": "q", "responses": [{"text": "right"}]}]
    base = [{"id": "a", "prompt": [{"role": "user", "content": "q"}], "responses": [{"text": "wrong"}]}]
    c, b = write_samples(tmp_path / "c.jsonl", cand), write_samples(tmp_path / "b.jsonl", base)
    assert compare(c, b, f"pairwise:{judges}:right")["win_rate"] == 1.0
    (tmp_path / "np_judge.py").write_text("import numpy as np\ndef half(items):\n"
                                          "    return [np.float32(0.5) for _ in items]\n")
    assert compare(c, b, f"pairwise:{tmp_path / 'np_judge.py'}:half")["win_rate"] == 0.5
    with pytest.raises(MinalignError, match="bootstrap >= 1"):
        compare(c, b, f"pairwise:{judges}:right", bootstrap=0)


@pytest.mark.parametrize("judge, phrase", [
    ("bogus", "--judge 'bogus': expected 'pairrm:DIR'"),
    ("pairwise:{}:too_few", "expected one probability per comparison (6), got 1 items"),
    ("pairwise:{}:not_a_probability", "comparison 0: 1.5 is not a probability in [0, 1]"),
    ("pairwise:{}:nothing", "has no function 'nothing'"),
    ("{}:too_few", "expected one list of scores per row (3 rows), got 1 items"),
    ("pairrm:/no/such/dir", "/no/such/dir"),
])
def test_bad_judges_are_one_line(tmp_path, judges, capsys, judge, phrase):
    rows = three_rows()
    c, b = write_samples(tmp_path / "c.jsonl", rows), write_samples(tmp_path / "b.jsonl", rows)
    code, err = run_main(["--candidate", c, "--baseline", b, "--judge", judge.format(judges), "--out",
                          tmp_path / "o.json"], capsys)
    assert code == 2 and phrase in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.json").exists()


def test_rewards_judge_needs_rewards(tmp_path, capsys):
    rows = [{"id": 0, "prompt": "q", "responses": [{"text": "a"}]}]
    c, b = write_samples(tmp_path / "c.jsonl", rows), write_samples(tmp_path / "b.jsonl", rows)
    code, err = run_main(["--candidate", c, "--baseline", b, "--judge", "rewards", "--out", tmp_path / "o"], capsys)
    assert code == 2 and 'a candidate response has no finite "reward"' in err, err
    with pytest.raises(MinalignError, match="no rows"):
        compare(write_samples(tmp_path / "e.jsonl", []), b, "rewards")


LATE_RANK = '''
import os, sys, time
from minalign import compare
real = compare.output_done

def late(*args, **kwargs):  # rank 1 looks at --out only after rank 0 could have written it
    if os.environ["RANK"] == "1":
        time.sleep(3)
    return real(*args, **kwargs)

compare.output_done = late
sys.path.insert(0, sys.argv.pop(1))
import score
sys.exit(score.main(sys.argv[1:]))
'''


def test_under_torchrun_a_rank_that_looks_late_still_takes_the_same_branch(files, judges, tmp_path):
    """torchrun, 2 ranks, rank 1 slow to check --out: rank 0 may not write it before every rank has looked (it did,
    and rank 1 then found the stage done, left for the loop's next barrier, and rank 0 waited forever)."""
    import subprocess
    import sys
    from tests.test_sample_cli import ENV, ROOT
    script = tmp_path / "late.py"
    script.write_text(LATE_RANK)
    out = tmp_path / "cmp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(ROOT), "--candidate", str(files[0]), "--baseline", str(files[1]), "--judge",
           f"pairwise:{judges}:longer", "--out", str(out), "--resume", "--device", "cpu"]
    run = subprocess.run(cmd, cwd=ROOT, env={**ENV, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(out.read_text())["prompts"] == 300
