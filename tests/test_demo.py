"""minalign.demo: the ground-truth metric, a reduced demo built once — whose learning signal is real: the teacher/base
log-ratio ranks the right answer above its near misses — and build's resume (what exists is skipped, what is missing
is rebuilt, a killed run's leftovers are cleared, other settings are refused).
"""
import collections
import json
import math
import shutil
from pathlib import Path

import pytest

import minalign
from minalign import demo, train_state
from minalign import train as trainer
from minalign.chat import end_token_id, render_prompt
from minalign.errors import MinalignError
from minalign.data import read_jsonl
from minalign.logratio import LogRatioReward
from tests.test_sample_cli import one_thread  # noqa: F401 (autouse: one torch thread)

# 75 questions (operands 0..4), 15 of them held out; builds in ~5 s on one thread (the defaults: 300 questions,
# 3000 + 300 steps, ~30 s on two).
SMALL = dict(max_operand=4, eval_per_source=5, base_steps=300, teacher_steps=100)
# Measured with SMALL, seeds 0-3, over all 75 questions: the right answer beats all six near misses on 0.98-1.0
# of them; the base gives the right answer 0.25-0.28 of its probability, the teacher 0.83-0.89; sampled at
# temperature 1 (4 per question), the base is right 0.23-0.29 of the time, the teacher 0.82-0.90.
RANKED_FIRST_MIN = 0.8


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(settings, paths, log lines) of the reduced demo, built once."""
    d = demo.DemoSection(out=str(tmp_path_factory.mktemp("demo") / "setup"), **SMALL)
    lines = []
    return d, demo.build(d, log=lines.append), lines


def rows_of(path: Path) -> list[dict]:
    return [row for _, row in read_jsonl(path)]


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


LR_AT = trainer.lr_at  # the real one, for kill_at to wrap


class Killed(BaseException):
    """Stands for a kill -9: nothing in the code under test catches it."""


def kill_at(monkeypatch, run: str, step: int) -> None:
    """Make the trainer die as it begins 0-based step `step` of the run dir named `run` (the steps before it done,
    the ones since the last checkpoint lost, as a kill -9 would leave them); replaces an earlier kill_at."""
    def lr_at(s, t):
        if Path(t.out).name == run and s == step:
            raise Killed(f"{run} at step {s}")
        return LR_AT(s, t)
    monkeypatch.setattr(trainer, "lr_at", lr_at)


def test_accuracy_reads_the_ground_truth_from_the_prompt():
    rows = [{"prompt": "What is 7 plus 5?", "responses": [{"text": "12"}, {"text": "13"}, {"text": " 12\n"},
                                                           {"text": "12 apples"}, {"text": "⁇ 1"}, {"text": ""}]},
            {"prompt": "What is 3 minus 8?", "responses": [{"text": "-5", "token_ids": [5]}, {"text": "5"}]},
            {"prompt": " What is 9 times 9? ", "responses": [{"text": "81"}, {"text": "081"}, {"text": "8 1"}]},
            {"prompt": "What is 0 times 4?", "responses": []}]
    assert demo.accuracy(rows) == [[1.0, 0.0, 1.0, 0.0, 0.0, 0.0], [1.0, 0.0], [1.0, 0.0, 0.0], []]
    with pytest.raises(ValueError, match=r"row 1: prompt 'What is 7 plus five\?' is not a demo question"):
        demo.accuracy([rows[0], {"prompt": "What is 7 plus five?", "responses": [{"text": "12"}]}])
    with pytest.raises(ValueError, match=r'row 0: responses\[1\] needs a "text" string'):
        demo.accuracy([{"prompt": "What is 1 plus 1?", "responses": [{"text": "2"}, {"token_ids": [3]}]}])
    with pytest.raises(ValueError, match="row 0: prompt .* is not a demo question"):
        demo.accuracy([{"prompt": [{"role": "user", "content": "What is 1 plus 1?"}], "responses": []}])


def test_check_names_the_bad_keys():
    with pytest.raises(MinalignError, match=r"demo.p_correct 0.97 · noisy_answers 12 must round to 1..11"):
        demo.check(demo.DemoSection(p_correct=0.97))
    with pytest.raises(MinalignError, match=r"demo.eval_per_source must be in 1..24.*demo.hidden_size must be"):
        demo.check(demo.DemoSection(max_operand=4, eval_per_source=25, hidden_size=60))
    demo.check(demo.DemoSection(**SMALL))


def test_build_writes_the_task_and_two_models(built):
    d, paths, lines = built
    out = Path(d.out)
    assert set(paths) == {"base", "teacher", "prompts", "eval"}
    pool, held = rows_of(paths["prompts"]), rows_of(paths["eval"])
    assert all(set(r) == {"id", "prompt", "source"} and demo.answer(r["prompt"]) is not None for r in pool + held)
    assert collections.Counter(r["source"] for r in held) == {"add": 5, "sub": 5, "mul": 5}
    assert collections.Counter(r["source"] for r in pool) == {"add": 20, "sub": 20, "mul": 20}
    assert not {r["prompt"] for r in pool} & {r["prompt"] for r in held}
    assert len({r["id"] for r in pool + held}) == 75

    # The base's data: every question 12 times, 6 right, each near miss once; the teacher's: every question, right.
    noisy = collections.defaultdict(list)
    for r in rows_of(out / "noisy.jsonl"):
        noisy[r["prompt"]].append(int(r["response"]) - demo.answer(r["prompt"]))
    assert len(noisy) == 75 and all(sorted(v) == sorted([0] * 6 + list(demo.OFFSETS)) for v in noisy.values())
    clean = rows_of(out / "clean.jsonl")
    assert len(clean) == 75 and all(r["response"] == str(demo.answer(r["prompt"])) for r in clean)

    for name in ("base", "teacher"):
        tok = minalign.load_tokenizer(paths[name])
        assert (tok.unk_id, tok.bos_id, tok.eos_id, end_token_id(tok, demo.TEMPLATE)) == (0, 1, 2, 2)
        assert minalign.load_model(paths[name]).config.vocab_size == tok.vocab_size
    assert not list(out.glob("*.run")) and not list(out.glob(".*"))  # the training runs and temp dirs are gone
    assert [line.split(" -> ")[-1] for line in lines if " -> " in line] == [
        str(out / name) for name in ("prompts.jsonl", "eval.jsonl", "noisy.jsonl", "clean.jsonl", "pairs.jsonl",
                                     "tokenizer", "base", "teacher")]
    pairs = rows_of(out / "pairs.jsonl")  # configs/dpo_tiny.toml's data: right over a near miss, pool questions
    assert [r["prompt"] for r in pairs] == [r["prompt"] for r in rows_of(paths["prompts"])]
    assert all(r["chosen"] == str(demo.answer(r["prompt"])) and int(r["rejected"]) - int(r["chosen"]) in demo.OFFSETS
               for r in pairs)


def test_log_ratio_ranks_the_right_answer_above_near_misses(built):
    """For every question, the right answer and its six near misses (tokenized as the sampler would emit them,
    end token included), scored by log π_teacher − log π_base: the right one should come first."""
    _, paths, _ = built
    tok = minalign.load_tokenizer(paths["base"])
    end = end_token_id(tok, demo.TEMPLATE)
    rows = []
    for r in rows_of(paths["eval"]) + rows_of(paths["prompts"]):
        truth = demo.answer(r["prompt"])
        rows.append({"prompt": r["prompt"], "responses": [{"token_ids": tok.encode(str(truth + o)) + [end]}
                                                          for o in (0, *demo.OFFSETS)]})
    scored = LogRatioReward(paths["teacher"], paths["base"], policy_template=demo.TEMPLATE,
                            reference_template=demo.TEMPLATE).score(rows)
    rewards = [[r["reward"] for r in row["responses"]] for row in scored]
    first = sum(all(r[0] > x for x in r[1:]) for r in rewards) / len(rewards)
    assert first >= RANKED_FIRST_MIN, f"the right answer has the highest reward on only {first:.3f} of the questions"
    # Why: the base is unsure of the right answer, the teacher sure of it.
    base = sum(math.exp(row["responses"][0]["reference_logprob"]) for row in scored) / len(scored)
    teacher = sum(math.exp(row["responses"][0]["policy_logprob"]) for row in scored) / len(scored)
    assert base < 0.5 and teacher > 0.7, f"P(right answer): base {base:.3f}, teacher {teacher:.3f}"


def test_sampled_answers_are_scored_by_accuracy(built):
    """Sampled at temperature 1, the base is right far less often than the teacher (texts as the sampler decodes
    them, so accuracy's reading of them is tested too)."""
    _, paths, _ = built
    tok = minalign.load_tokenizer(paths["base"])
    prompts = rows_of(paths["eval"]) + rows_of(paths["prompts"])
    ids = [render_prompt(tok, demo.TEMPLATE, r["prompt"]) for r in prompts]
    rate = {}
    for name in ("base", "teacher"):
        samples = minalign.generate(minalign.load_model(paths[name]), ids, n=4, max_new_tokens=8, temperature=1.0,
                                    stop_token_ids=[end_token_id(tok, demo.TEMPLATE)], tokenizer=tok, seed=0)
        rows = [{"prompt": r["prompt"], "responses": [{"text": s.text} for s in ss]} for r, ss in zip(prompts, samples)]
        scores = [x for row in demo.accuracy(rows) for x in row]
        rate[name] = sum(scores) / len(scores)
    assert rate["base"] < 0.5 < 0.7 < rate["teacher"], rate


def test_build_resumes(built, tmp_path):
    d, paths, _ = built
    copy = tmp_path / "setup"
    shutil.copytree(d.out, copy)  # copy2: mtimes kept
    again = demo.DemoSection(out=str(copy), **SMALL)
    before = mtimes(copy)
    lines = []
    assert demo.build(again, log=lines.append) == {k: copy / p.name for k, p in paths.items()}
    assert lines == [] and mtimes(copy) == before  # nothing redone, nothing touched

    # A teacher run dir the trainer cannot resume (latest.json names no checkpoint) and a deleted eval.jsonl: both
    # come back, nothing else.
    shutil.rmtree(copy / "teacher")
    (copy / "eval.jsonl").unlink()
    (copy / "teacher.run" / "checkpoints").mkdir(parents=True)
    (copy / "teacher.run" / "latest.json").write_text('{"checkpoint": "checkpoints/step_000050", "step": 50}\n')
    demo.build(again, log=lines.append)
    assert [line.split(" -> ")[-1] for line in lines if " -> " in line] == [str(copy / "eval.jsonl"),
                                                                            str(copy / "teacher")]
    assert rows_of(copy / "eval.jsonl") == rows_of(paths["eval"])
    assert minalign.load_model(copy / "teacher") is not None and not (copy / "teacher.run").exists()
    after = mtimes(copy)
    assert {k: v for k, v in after.items() if not k.startswith(("teacher", "eval"))} == \
        {k: v for k, v in before.items() if not k.startswith(("teacher", "eval"))}

    with pytest.raises(MinalignError, match=r"demo.json: .* other settings \(seed 0 -> 1\)"):
        demo.build(demo.DemoSection(out=str(copy), **{**SMALL, "seed": 1}))


def test_build_resumes_a_killed_training_from_its_checkpoint(built, tmp_path, monkeypatch, capsys):
    """Killed mid-way through the base, then mid-way through the teacher, the build resumes each from its last
    checkpoint, and both models are byte for byte those of the uninterrupted build (made with another SAVE_EVERY,
    so checkpointing does not change the training either)."""
    d, paths, _ = built
    copy = tmp_path / "setup"
    shutil.copytree(d.out, copy)
    shutil.rmtree(copy / "base")
    shutil.rmtree(copy / "teacher")
    again = demo.DemoSection(out=str(copy), **SMALL)
    monkeypatch.setattr(demo, "SAVE_EVERY", 40)

    kill_at(monkeypatch, "base.run", 150)  # checkpoints at steps 40, 80, 120; 30 steps lost
    with pytest.raises(Killed):
        demo.build(again, log=lambda line: None)
    assert train_state.latest_checkpoint(copy / "base.run") == copy / "base.run" / "checkpoints" / "step_000120"
    capsys.readouterr()

    kill_at(monkeypatch, "teacher.run", 70)  # the base resumes and finishes, the teacher dies after step 40's save
    lines = []
    with pytest.raises(Killed):
        demo.build(again, log=lines.append)
    assert lines[0] == f"demo: training the base (300 SFT steps on {copy / 'noisy.jsonl'}, resuming at step 120)"
    assert f"resuming from {copy / 'base.run' / 'checkpoints' / 'step_000120'} at step 120" in capsys.readouterr().err
    assert (copy / "base").is_dir() and not (copy / "base.run").exists()

    monkeypatch.setattr(trainer, "lr_at", LR_AT)  # no more kills
    moved = tmp_path / "moved"  # the killed teacher run, resumed from another demo.out, is started over
    shutil.copytree(copy, moved)
    lines = []
    demo.build(again, log=lines.append)
    assert lines[0] == f"demo: training the teacher (100 SFT steps on {copy / 'clean.jsonl'}, resuming at step 40)"
    assert f"resuming from {copy / 'teacher.run' / 'checkpoints' / 'step_000040'} at step 40" in capsys.readouterr().err
    for name in ("base", "teacher"):
        assert contents(copy / name) == contents(paths[name]), name
    assert not list(copy.glob("*.run")) and not list(copy.glob(".*"))

    lines = []
    demo.build(demo.DemoSection(out=str(moved), **SMALL), log=lines.append)
    assert lines[0].startswith(f"demo: cannot resume {moved / 'teacher.run'} (step_000040 written with other "
                               f"settings: data.path, model.path, train.out); starting it over")
    assert lines[1] == f"demo: training the teacher (100 SFT steps on {moved / 'clean.jsonl'})"
    assert contents(moved / "teacher") == contents(paths["teacher"])

    # Killed after the training but before its final/ was moved into place, or before the run dir was removed.
    shutil.rmtree(copy / "base.run", ignore_errors=True)
    (copy / "teacher.run").mkdir()
    (copy / "teacher").rename(copy / "teacher.run" / "final")
    (copy / "base.run" / "checkpoints").mkdir(parents=True)
    lines = []
    demo.build(again, log=lines.append)
    assert [line.split(" -> ")[-1] for line in lines] == [str(copy / "teacher")]
    assert contents(copy / "teacher") == contents(paths["teacher"]) and not list(copy.glob("*.run"))


def test_a_round_of_the_demo_writes_its_audit_report(built, tmp_path):
    """One round of the demo's loop (its config, on the reduced setup): round 0's report.html colours every token of
    the log ratio by its term, marks what selection kept, lists the prompts where the reward kept a wrong answer,
    and opens in headless Chromium (when installed) with no console error."""
    from minalign.loop import run_loop
    from minalign.loop_setup import load_loop_config
    from minalign.settings import read_toml
    from tests.test_report import _chromium, open_in_chromium

    d, paths, _ = built
    tables = read_toml(str(Path(__file__).parents[1] / "configs" / "demo.toml"))
    tables.pop("demo")
    setup = Path(d.out)
    over = {"loop.out": str(tmp_path / "run"), "loop.rounds": 1, "policy.path": str(setup / "base"),
            "prompts.path": str(setup / "prompts.jsonl"), "prompts.eval_path": str(setup / "eval.jsonl"),
            "reward.policy": str(setup / "teacher"), "reward.reference": str(setup / "base"), "sample.n": 4}
    run_loop(load_loop_config(tables, [(k, json.dumps(v)) for k, v in over.items()]))
    page = (tmp_path / "run" / "round_0" / "report.html").read_text()
    scores = rows_of(tmp_path / "run" / "round_0" / "scores.jsonl")
    tokens = sum(len(r["token_ids"]) for row in scores for r in row["responses"][:1])
    assert page.count('class="t" style=') >= tokens  # every token of the prompts shown in full is a coloured span
    assert " term " in page and ">kept<" in page and "kept right" in page
    kept = {r["id"]: r["response"] for r in rows_of(tmp_path / "run" / "round_0" / "train.jsonl")}
    truth = demo.accuracy(scores)
    wrong = sum(1 for row, right in zip(scores, truth) if row["id"] in kept and max(right) == 1
                and demo.accuracy([{**row, "responses": [{"text": kept[row["id"]]}]}])[0][0] == 0)
    assert f"although a right one was sampled ({wrong} of {len(scores)} prompts" in page
    if _chromium() is None:
        pytest.skip("headless Chromium is not installed (Debian: apt install chromium): the page was not opened")
    dom, console = open_in_chromium(tmp_path / "run" / "round_0" / "report.html", "#q=plus")
    assert not [c for c in console if "Uncaught" in c or "rror" in c], console
    assert dom.count("<li>") >= 1 and "plus" in dom.split('<ol id="results">')[1]
