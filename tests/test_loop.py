"""The alignment loop (minalign/loop.py): both recipes on tiny random models, resume at every stage boundary,
selection against hand cases, prompt draws, user reward functions, and train.py's dispatch."""
import json
import shlex
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minalign
import sample as sample_cli
import score as score_cli
import train as train_cli
from minalign.errors import MinalignError
from minalign.data import read_jsonl
from minalign import report
from minalign.evaluate import table
from minalign.loop import run_loop
from minalign.loop_setup import load_loop_config
from minalign.prompts import draw_prompts, split_pool
from minalign.select import candidates, select_best, select_pairs
from tests.test_pairrm import _hf_dir, _random_pairrm, deberta_tok_dir, sp_models, tiny_cfg  # noqa: F401 (fixtures)
from tests.test_sample_cli import one_thread  # noqa: F401 (autouse: one torch thread)
from tests.test_trainer import torchrun_train

PROMPTS = [("What is a cat?", "animals"), ("Name a red fruit.", "food"), ("Why is the sky blue?", "science"),
           ("Say hello.", "chat"), ("Count to three.", "chat"), ("What do dogs eat?", "animals"),
           ("Is bread good?", "food"), ("How fast is light?", "science")]


def _model(d: Path, tok_dir: Path, seed: int) -> Path:
    tok = minalign.load_tokenizer(tok_dir)
    cfg = minalign.get_config("tiny-mistral", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=256)
    minalign.save_model(minalign.Transformer(cfg).init_weights(seed=seed), d)
    tok.save(d)
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory, mistral_tokenizer_dir):
    """(policy π0, reward 'instruct', reward 'base') tiny random models sharing a tokenizer; a prompts pool."""
    d = tmp_path_factory.mktemp("loop")
    paths = [_model(d / name, mistral_tokenizer_dir, seed) for name, seed in [("pi0", 0), ("inst", 1), ("base", 2)]]
    pool = d / "prompts.jsonl"
    pool.write_text("".join(json.dumps({"prompt": p, "source": s}) + "\n" for p, s in PROMPTS))
    return (*paths, pool)


def config(models, out: Path, recipe: str = "rejection-sampling", **extra):
    over = {**tiny_settings(models, out), "loop.recipe": recipe, **extra}
    return load_loop_config(None, [(k, _toml(v)) for k, v in over.items()])


def tiny_settings(models, out: Path) -> dict:
    """The tiny loop of these tests: 2 rounds of 4 prompts (2 held out), 3 samples of 6 tokens, 1 epoch."""
    pi0, inst, base, pool = models
    return {"loop.out": out, "loop.rounds": 2, "loop.patience": 0, "loop.epochs": 1,
            "policy.path": pi0, "prompts.path": pool, "prompts.per_round": 4, "prompts.by_source": True,
            "prompts.eval_size": 2, "sample.n": 3, "sample.max_new_tokens": 6, "sample.temperature": 1.0,
            "sample.batch_size": 2, "reward.policy": inst, "reward.reference": base,
            "reward.policy_template": "mistral", "reward.reference_template": "mistral", "train.batch_size": 2,
            "train.micro_batch_size": 1,
            "train.lr": 1e-3, "select.keep_truncated": True, "data.max_length": 128, "data.max_prompt_length": 64}


def _toml(v) -> str:
    """A value as the TOML text of a --section.key override."""
    if isinstance(v, bool):
        return str(v).lower()
    return json.dumps(str(v)) if isinstance(v, (str, Path)) else str(v)


def _artifacts(run: Path) -> dict[str, bytes]:
    """Every file a loop run leaves, by relative path; run dir paths inside them made relative."""
    out = {}
    for p in sorted(run.rglob("*")):
        if p.is_file() and p.suffix != ".png" and "metrics.jsonl" not in p.name:
            data = p.read_bytes().replace(str(run).encode(), b"RUN")
            out[str(p.relative_to(run))] = data
    return out


def test_rejection_sampling_two_rounds(models, tmp_path, capsys):
    cfg = config(models, tmp_path / "rs")
    capsys.readouterr()
    summary = run_loop(cfg)
    run = tmp_path / "rs"
    # the last lines name the best policy as π_k (round k's metrics are of the policy it starts from, which round
    # k − 1 trained) and where the summary went
    k = summary["best"]["round"]
    made = "the starting policy" if k == 0 else f"trained in round {k - 1}"
    err = capsys.readouterr().err
    assert f"loop: best policy: π_{k} (the highest batch reward, " in err and f"; {made}): " in err, err
    assert err.rstrip().endswith(f"loop: summary: {run / 'summary.json'}, {run / 'summary.png'}, and the link "
                                 f"{run / 'best'} to the best policy"), err[-300:]
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert json.loads((run / "summary.json").read_text()) == summary
    assert (run / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", (run / "summary.png").read_bytes()[16:24])
    assert width > 400 and height > 200
    for k in (0, 1):
        d = run / f"round_{k}"
        scores = [row for _, row in read_jsonl(d / "scores.jsonl")]
        prompts = [row for _, row in read_jsonl(d / "prompts.jsonl")]
        assert [r["id"] for r in scores] == [r["id"] for r in prompts] and len(prompts) == 4
        assert all(len(r["responses"]) == 3 for r in scores)
        # the training rows are each prompt's argmax among its candidates, with its reward
        rows = [row for _, row in read_jsonl(d / "train.jsonl")]
        want = {r["id"]: max(candidates(r, True), key=lambda j: r["responses"][j]["reward"]) for r in scores
                if candidates(r, True)}
        assert {r["id"] for r in rows} == set(want)
        by_id = {r["id"]: r for r in scores}
        for row in rows:
            best = by_id[row["id"]]["responses"][want[row["id"]]]
            assert (row["response"], row["reward"]) == (best["text"], best["reward"])
        m = json.loads((d / "metrics.json").read_text())
        rewards = [r["reward"] for row in scores for r in row["responses"]]
        assert m["batch_reward"] == pytest.approx(sum(rewards) / len(rewards))
        assert m["batch_reward_max"] == pytest.approx(sum(max(r["reward"] for r in row["responses"])
                                                          for row in scores) / len(scores))
        assert m["mean_length"] == pytest.approx(sum(len(r["token_ids"]) for row in scores
                                                     for r in row["responses"]) / len(rewards))
        assert len([1 for _ in read_jsonl(d / "eval_scores.jsonl")]) == 2
        assert not (d / "train" / "checkpoints").exists()  # optimizer state dropped once final/ is in place
    # round k+1 samples from what round k trained
    assert summary["rounds"][1]["policy"] == str(run / "round_0" / "train" / "final")
    assert not (run / "round_2" / "train.jsonl").exists()  # the last round only evaluates
    best = max(summary["rounds"], key=lambda r: r["batch_reward"])
    assert summary["best"] == {"round": best["round"], "policy": best["policy"]}
    assert (run / "best").resolve() == Path(best["policy"]).resolve()
    # the trained policy differs from the one it started from
    w0 = load_file(run / "round_0" / "train" / "final" / "model.safetensors")
    w1 = load_file(run / "round_1" / "train" / "final" / "model.safetensors")
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    assert "batch reward" in table(summary["rounds"])
    # started again: nothing to do, the same summary
    assert run_loop(cfg) == summary


def test_each_printed_stage_command_redoes_its_artifact_byte_for_byte(models, tmp_path, capsys):
    """The loop prints each stage it runs as the command line that redoes it (settings.command_line, from the
    stage's typed config); run as printed, into another output, each gives the loop's artifact byte for byte."""
    run = tmp_path / "rs"
    capsys.readouterr()
    run_loop(config(models, run, recipe="iterative-dpo", **{"loop.rounds": 1, "loop.dpo_reference": "initial"}))
    printed = [shlex.split(line.split("loop:   python ", 1)[1]) for line in capsys.readouterr().err.splitlines()
               if line.startswith("loop:   python ")]
    assert [argv[0] for argv in printed] == ["sample.py", "score.py", "sample.py", "score.py", "-m", "train.py"] + \
        ["sample.py", "score.py", "sample.py", "score.py", "score.py", "-m"], printed
    assert "--candidate" in printed[-2]  # round 1's comparison with round 0, on the held-out prompts
    mains = {"sample.py": sample_cli.main, "score.py": score_cli.main, "train.py": train_cli.main,
             "minalign.report": report.main}
    # round 0: its samples, scores, held-out samples and scores, its report and its training; round 1's comparison
    for argv in printed[:6] + printed[-2:-1]:
        if argv[0] == "-m":  # python -m minalign.report ...
            argv = argv[1:]
        script, flags = argv[0], argv[1:]
        out_flag = "--train.out" if script == "train.py" else "--out"
        i = flags.index(out_flag) + 1
        theirs, ours = Path(flags[i]), tmp_path / "again" / Path(flags[i]).name
        ours.parent.mkdir(exist_ok=True)
        flags[i] = str(ours)
        assert mains[script](flags) == 0, (script, capsys.readouterr().err)
        if script == "train.py":  # the weights and their config, not the checkpoints' bookkeeping
            theirs, ours = theirs / "final" / "model.safetensors", ours / "final" / "model.safetensors"
        assert ours.read_bytes() == theirs.read_bytes(), (script, ours)
    # the round's win rate in metrics.json is that comparison's
    m = json.loads((run / "round_1" / "metrics.json").read_text())
    by_hand = json.loads((tmp_path / "again" / "compare.json").read_text())
    assert by_hand["judge"] == "rewards" and by_hand["prompts"] == 2
    assert {k: m[k] for k in ("win_rate", "win_rate_interval", "lc_win_rate", "lc_win_rate_interval")} == \
        {k: by_hand[k] for k in ("win_rate", "win_rate_interval", "lc_win_rate", "lc_win_rate_interval")}


@pytest.mark.parametrize("reference", ["previous", "initial"])
def test_iterative_dpo_two_rounds(models, tmp_path, reference):
    cfg = config(models, tmp_path / "dpo", "iterative-dpo", **{"loop.dpo_reference": reference, "dpo.beta": 0.1})
    summary = run_loop(cfg)
    run = tmp_path / "dpo"
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    for k in (0, 1):
        d = run / f"round_{k}"
        scores = {r["id"]: r for _, r in read_jsonl(d / "scores.jsonl")}
        for _, row in read_jsonl(d / "train.jsonl"):
            rewards = [r["reward"] for r in scores[row["id"]]["responses"]]
            assert row["chosen_reward"] == max(rewards) and row["rejected_reward"] == min(rewards)
            assert row["chosen_reward"] > row["rejected_reward"]
        header = json.loads((d / "train.jsonl.ref-logps.jsonl").read_text().split("\n")[0])
        ref = header["reference"]
        want = models[0] if reference == "initial" or k == 0 else run / "round_0" / "train" / "final"
        assert Path(ref).resolve() == Path(want).resolve(), header


def test_killed_at_every_stage_boundary_resumes_to_the_same_artifacts(models, tmp_path):
    """A chain of runs, each killed at the next stage boundary, ends with the files of an uninterrupted run."""
    run_loop(config(models, tmp_path / "whole"))
    boundaries, kills = [], 0

    while True:
        seen = []

        def kill_next(k, name):
            seen.append((k, name))
            if len(seen) > len(boundaries) and (k, name) not in boundaries:  # a boundary this chain has not cut
                boundaries.append((k, name))
                raise KeyboardInterrupt
        try:
            run_loop(config(models, tmp_path / "cut"), after_stage=kill_next)
            break
        except KeyboardInterrupt:
            kills += 1
    # every stage of round 0 (9), of round 1 (10: and its comparison with round 0), and round 2's (8: no training)
    assert kills == len(boundaries) == 9 + 10 + 8, boundaries
    want, got = _artifacts(tmp_path / "whole"), _artifacts(tmp_path / "cut")
    want = {k: v.replace(b"whole", b"RUN") for k, v in want.items()}
    got = {k: v.replace(b"cut", b"RUN") for k, v in got.items()}
    assert sorted(got) == sorted(want)
    differ = [k for k in want if want[k] != got[k]]
    assert not differ, differ


def test_restart_with_other_settings_is_refused(models, tmp_path):
    cfg = config(models, tmp_path / "r", **{"loop.rounds": 1})
    run_loop(cfg)
    with pytest.raises(MinalignError, match="other settings \\(sample.temperature\\)"):
        run_loop(config(models, tmp_path / "r", **{"loop.rounds": 1, "sample.temperature": 0.5}))
    # more rounds may be asked for: the finished ones are kept, one more is run
    summary = run_loop(config(models, tmp_path / "r", **{"loop.rounds": 2}))
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]


def test_python_reward_function(models, tmp_path):
    fn = tmp_path / "my_reward.py"
    fn.write_text("def length(rows):\n    return [[len(r['text']) for r in row['responses']] for row in rows]\n"
                  "def broken(rows):\n    return [[1.0] for row in rows]\n")
    cfg = config(models, tmp_path / "py", **{"loop.rounds": 1, "reward.kind": "python",
                                             "reward.function": f"{fn}:length"})
    run_loop(cfg)
    for _, row in read_jsonl(tmp_path / "py" / "round_0" / "scores.jsonl"):
        assert [r["reward"] for r in row["responses"]] == [len(r["text"]) for r in row["responses"]]
    cfg = config(models, tmp_path / "py2", **{"loop.rounds": 1, "reward.kind": "python",
                                              "reward.function": f"{fn}:broken"})
    with pytest.raises(MinalignError, match="broken: row 0 .* has 3 responses but got \\[1.0\\]"):
        run_loop(cfg)
    cfg = config(models, tmp_path / "py3", **{"reward.kind": "python", "reward.function": f"{fn}:nothing"})
    with pytest.raises(MinalignError, match="has no function 'nothing'"):
        run_loop(cfg)


def _row(rewards, texts=None, reasons=None):
    texts = texts or [f"r{j}" for j in range(len(rewards))]
    reasons = reasons or ["stop"] * len(rewards)
    return {"id": 7, "prompt": "p", "responses": [{"text": t, "reward": r, "finish_reason": f, "token_ids": [1]}
                                                  for t, r, f in zip(texts, rewards, reasons)]}


def test_selection_hand_cases():
    rows, stats = select_best([_row([0.1, 0.5, -2.0])])
    assert rows == [{"id": 7, "prompt": "p", "response": "r1", "reward": 0.5}]
    assert stats == {"prompts": 1, "selected": 1, "no_candidate": 0}
    assert select_best([_row([0.5, 0.5, 0.5])])[0][0]["response"] == "r0"  # ties: the first
    # empty and truncated responses are never picked, however high their reward ...
    row = _row([9.0, 8.0, 1.0], texts=["  ", "cut", "ok"], reasons=["stop", "length", "stop"])
    assert select_best([row])[0][0]["response"] == "ok"
    assert select_best([row], keep_truncated=True)[0][0]["response"] == "cut"
    # ... and a prompt whose samples are all empty or truncated gives no row
    dead = _row([1.0, 2.0], texts=["", "x"], reasons=["stop", "length"])
    assert select_best([dead]) == ([], {"prompts": 1, "selected": 0, "no_candidate": 1})
    assert select_pairs([dead])[1] == {"prompts": 1, "selected": 0, "no_candidate": 1, "tied": 0}

    rows, _ = select_pairs([_row([0.3, -1.0, 2.0, -1.0])])
    assert rows == [{"id": 7, "prompt": "p", "chosen": "r2", "rejected": "r3", "chosen_reward": 2.0,
                     "rejected_reward": -1.0}]  # bottom ties: the last, so top and bottom differ when they can
    assert select_pairs([_row([1.0, 1.0, 1.0])]) == ([], {"prompts": 1, "selected": 0, "no_candidate": 0, "tied": 1})
    assert select_pairs([_row([1.0, 1.05])], min_margin=0.1)[1]["tied"] == 1
    assert len(select_pairs([_row([1.0, 1.05])], min_margin=0.01)[0]) == 1
    assert select_pairs([_row([5.0, 1.0], texts=["only", ""])])[1]["no_candidate"] == 1  # one candidate: no pair
    # per_token: ranked by reward per response token. Sums −8 (8 tokens), −3 (1 token), −6 (2 tokens): by the sum
    # the 2-token one is the chosen, per token (−1, −3, −3) the 8-token one; the last of equals is the rejected
    long = _row([-8.0, -3.0, -6.0])
    for r, n in zip(long["responses"], (8, 1, 2)):
        r["token_ids"] = [1] * n
    assert [select_pairs([long])[0][0][k] for k in ("chosen", "rejected")] == ["r1", "r0"]
    rows, _ = select_pairs([long], per_token=True)
    assert (rows[0]["chosen"], rows[0]["rejected"], rows[0]["chosen_reward"], rows[0]["rejected_reward"]) == \
        ("r0", "r2", -1.0, -3.0)
    # a system message used in sampling goes into the training row's prompt
    rows, _ = select_best([_row([1.0, 0.0])], system="Be brief.")
    assert rows[0]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "p"}]


def test_prompt_draws():
    pool = [{"id": i, "prompt": f"q{i}", "source": "ab"[i < 2]} for i in range(8)]  # source b: 2, source a: 6
    r0, r1 = (draw_prompts(pool, 4, True, 0, k) for k in (0, 1))
    assert [r["source"] for r in r0].count("b") == 2 and [r["source"] for r in r1].count("b") == 2
    seen = [r["id"] for r in r0 + r1 if r["source"] == "a"]
    assert len(seen) == 4 and len(set(seen)) == 4  # a's prompts are not repeated before all are used
    uniform = [draw_prompts(pool, 3, False, 0, k) for k in range(3)]
    assert sorted(r["id"] for rows in uniform[:2] for r in rows)[:6] == sorted({r["id"] for rows in uniform[:2]
                                                                                  for r in rows})
    assert len(draw_prompts(pool, 0, False, 0, 0)) == 8
    assert draw_prompts(pool, 4, True, 0, 0) == r0  # deterministic
    train_rows, held = split_pool(pool, 3, 0)
    assert len(held) == 3 and not {r["id"] for r in held} & {r["id"] for r in train_rows}
    with pytest.raises(MinalignError, match="eval_size 8 leaves no prompts"):
        split_pool(pool, 8, 0)


def test_bad_settings_and_prompts(models, tmp_path):
    with pytest.raises(MinalignError, match="loop.recipe must be one of"):
        config(models, tmp_path / "x", **{"loop.recipe": "ppo"})
    with pytest.raises(MinalignError, match="sample.n must be >= 2"):
        config(models, tmp_path / "x", **{"sample.n": 1})
    with pytest.raises(MinalignError, match="unknown config key loop.round;"):
        config(models, tmp_path / "x", **{"loop.round": 2})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=f"{bad}:2: a row needs exactly one of"):
        run_loop(config(models, tmp_path / "y", **{"prompts.path": bad}))
    bad.write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
    with pytest.raises(ValueError, match=f"{bad}:2: duplicate id 1"):
        run_loop(config(models, tmp_path / "z", **{"prompts.path": bad}))


def test_train_py_runs_a_loop_config(models, tmp_path, capsys):
    pi0, inst, base, pool = models
    toml = tmp_path / "loop.toml"
    toml.write_text(f"""
[loop]
out = "{tmp_path}/cli-{{recipe}}"
rounds = 1
epochs = 1
[policy]
path = "{pi0}"
[prompts]
path = "{pool}"
per_round = 3
[sample]
n = 2
max_new_tokens = 4
[reward]
policy = "{inst}"
policy_template = "mistral"
reference = "{base}"
reference_template = "raw"
[select]
keep_truncated = true
[data]
max_length = 256
max_prompt_length = 128
[train]
batch_size = 1
micro_batch_size = 1
""")
    assert train_cli.main(["--config", str(toml), "--recipe", "iterative-dpo", "--sample.temperature", "1.0"]) == 0
    summary = json.loads((tmp_path / "cli-iterative-dpo" / "summary.json").read_text())
    assert summary["recipe"] == "iterative-dpo" and len(summary["rounds"]) == 2
    err = capsys.readouterr().err
    assert "python sample.py --model" in err and "python score.py --samples" in err  # the stages, as commands
    assert "batch reward" in err
    assert train_cli.main(["--config", str(Path(__file__).parent.parent / "configs" / "sft_tiny.toml"),
                           "--recipe", "iterative-dpo"]) == 2
    assert "has no [loop] table" in capsys.readouterr().err


def test_torchrun_two_processes(models, tmp_path):
    """Under torchrun (2 ranks, gloo) each stage shares its work out; round 0's files are the one-process ones, byte
    for byte, and the policy DDP trains equals the one-process policy (to float summation order)."""
    over = {"loop.rounds": 1, "train.device": "cpu"}
    one = config(models, tmp_path / "one", **over)
    run_loop(one)
    argv = []
    for k, v in {**tiny_settings(models, tmp_path / "two"), **over}.items():
        argv += [f"--{k}", _toml(v)]
    toml = tmp_path / "loop.toml"
    toml.write_text("[loop]\n")  # a loop config; every setting comes from the overrides
    torchrun_train(["--config", str(toml), *argv])
    for name in ["prompts", "samples", "scores", "eval_samples", "eval_scores", "train"]:
        a, b = (tmp_path / d / "round_0" / f"{name}.jsonl" for d in ("one", "two"))
        assert a.read_bytes() == b.read_bytes(), name
    w1, w2 = (load_file(tmp_path / d / "round_0" / "train" / "final" / "model.safetensors") for d in ("one", "two"))
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert diff < 1e-5, diff
    assert len(json.loads((tmp_path / "two" / "summary.json").read_text())["rounds"]) == 2


def test_train_stop_after_is_continued_by_a_restart(models, tmp_path):
    """train.stop_after ends a round's training early on purpose; the loop says so and the restart goes on."""
    over = {"loop.rounds": 1, "loop.epochs": 3, "train.save_every": 1}
    with pytest.raises(MinalignError, match="round 0: training stopped before its last step"):
        run_loop(config(models, tmp_path / "s", **over, **{"train.stop_after": 1}))
    assert (tmp_path / "s" / "round_0" / "train" / "checkpoints").is_dir()  # kept: the restart needs them
    summary = run_loop(config(models, tmp_path / "s", **over))
    assert len(summary["rounds"]) == 2 and not (tmp_path / "s" / "round_0" / "train" / "checkpoints").exists()
    run_loop(config(models, tmp_path / "whole", **over))
    w1, w2 = (load_file(tmp_path / d / "round_0" / "train" / "final" / "model.safetensors") for d in ("s", "whole"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_a_reference_free_reward_keeps_its_template_setting(models, tmp_path):
    """reward.reference = "" makes the reward reference-free, whatever reward.reference_template says (the
    shipped configs set one), and a loop.json written when the demo's settings were part of the loop config
    resumes."""
    from minalign.loop_setup import check_stages, fixed_settings
    cfg = config(models, tmp_path / "r", **{"reward.reference": ""})
    assert cfg.reward.reference_template == "mistral"
    check_stages(cfg, "cpu")  # used to refuse: "--reference-template goes with --reference"
    score_cfg = cfg.reward.stage_config(tmp_path / "s.jsonl", tmp_path / "o.jsonl", "cpu")
    assert score_cfg.reference_free and score_cfg.reference is None and score_cfg.reference_template is None
    run = tmp_path / "old"
    run.mkdir()
    cfg = config(models, run, **{"loop.rounds": 1})
    (run / "loop.json").write_text(json.dumps({"settings": {**fixed_settings(cfg), "demo": {"out": ""}}}))
    assert [r["round"] for r in run_loop(cfg)["rounds"]] == [0, 1]


def test_prompts_are_checked_before_any_work(models, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"messages": [{"role": "user", "content": "x"}, '
                   '{"role": "user", "content": "y"}]}\n')
    with pytest.raises(ValueError, match=f"{bad}:3: "):
        run_loop(config(models, tmp_path / "r", **{"prompts.path": bad, "prompts.eval_size": 1}))
    assert not (tmp_path / "r" / "loop.json").exists()  # nothing recorded: the mended file is accepted
    bad.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "' + "word " * 300 + '"}\n')
    with pytest.raises(ValueError, match=f"{bad}:3: the prompt is .* exceeds the policy's context of 256"):
        run_loop(config(models, tmp_path / "r", **{"prompts.path": bad, "prompts.eval_size": 1}))
    with pytest.raises(MinalignError, match="eval.metric: .* cannot import 'nowhere'"):
        run_loop(config(models, tmp_path / "r", **{"eval.metric": "nowhere:f"}))
    assert not (tmp_path / "r" / "loop.json").exists()


@pytest.mark.parametrize("key, value, phrase", [
    ("reward.policy", "/nowhere/at/all", "--policy /nowhere/at/all: no such directory"),
    ("reward.beta", "nan", "--beta nan is out of range"),
    ("sample.temperature", "nan", "--temperature nan is out of range"),
    ("sample.top_k", "-1", "--top-k -1 is out of range"),
    ("reward.sampler_end_ids", "[-1]", "--sampler-end-ids [-1] is out of range"),
    ("reward.batch_tokens", "0", "--batch-tokens 0 is out of range"),
    ("train.lr", "inf", "train.lr must be finite"),
    ("train.batch_size", "0", "train.batch_size must be >= 1"),
    ("train.adam_eps", "-1.0", "train.adam_eps must be > 0"),
    ("train.adam_betas", '["a", "b"]', "train.adam_betas: expected a list of floats"),
    ("train.seed", str(2**63), "train.seed must be in [0, 2147483648)"),
    ("loop.epochs", "nan", "loop.epochs and loop.warmup_ratio must be finite"),
    ("data.max_length", "5000", "data.max_length 5000 exceeds the context of 256 tokens"),
    ("select.per_token", "true", "select.per_token ranks iterative-dpo's samples by the per-token log ratio"),
    ("eval.judge", "log-ratio:policy=/nowhere/judge,policy_template=mistral", "/nowhere/judge"),
    ("dpo.loss_type", '"rdpo"', "dpo.loss_type rdpo needs dpo.alpha > 0"),
])
def test_every_setting_is_checked_before_any_work(models, tmp_path, key, value, phrase):
    """Each of these used to pass the start-up checks, write loop.json and fail hours later (after round 0's
    sampling, on a 7B run), when the fix was then refused as "other settings"."""
    out = tmp_path / "run"
    over = {k: _toml(v) for k, v in tiny_settings(models, out).items()}
    over[key] = value
    with pytest.raises(MinalignError) as e:
        run_loop(load_loop_config(None, list(over.items())))
    assert phrase in str(e.value), str(e.value)
    assert not out.exists()  # no loop.json, no round_0, not even an empty run dir


def test_pairrm_rounds_are_picked_by_win_rate(models, tmp_path, capsys, deberta_tok_dir, tiny_cfg):
    """With PairRM (scores relative within a prompt) the held-out win rate against π_0 picks the best round: every
    round from 1 on is judged by PairRM on the held-out samples against round 0's, and the last round samples
    only the held-out prompts."""
    d = _hf_dir(tmp_path, deberta_tok_dir, _random_pairrm(tiny_cfg))
    run = tmp_path / "prm"
    capsys.readouterr()
    summary = run_loop(config(models, run, "iterative-dpo", **{"reward.kind": "pairrm", "reward.path": d,
                                                             "eval.n": 2}))
    err = capsys.readouterr().err
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and "win_rate" not in rounds[0]
    for k in (1, 2):
        c = json.loads((run / f"round_{k}" / "compare.json").read_text())
        assert c["judge"] == f"pairrm:{d}" and c["candidate"].endswith(f"round_{k}/eval_samples.jsonl")
        assert c["baseline"].endswith("round_0/eval_samples.jsonl") and c["comparisons"] == 4
        assert rounds[k]["win_rate"] == c["win_rate"] and rounds[k]["lc_win_rate"] == c["lc_win_rate"]
    assert not (run / "round_2" / "samples.jsonl").exists() and rounds[2]["batch_reward"] is None
    best = max(rounds, key=lambda r: (r.get("win_rate", 0.5), -r["round"]))
    assert summary["best"] == {"round": best["round"], "policy": best["policy"]}
    assert f"best policy: π_{best['round']} (the highest win rate against π_0, " in err, err[-500:]
    assert "win rate" in table(rounds) and "LC win rate" in table(rounds)
    # a run from before the comparisons: round 1 measured without one gets it when the run is started again
    (run / "round_1" / "compare.json").unlink()
    m = json.loads((run / "round_1" / "metrics.json").read_text())
    (run / "round_1" / "metrics.json").write_text(json.dumps({k: v for k, v in m.items() if "win_rate" not in k}))
    assert run_loop(config(models, run, "iterative-dpo", **{"reward.kind": "pairrm", "reward.path": d,
                                                            "eval.n": 2})) == summary


def test_eval_judge_and_old_runs(models, tmp_path, capsys):
    """[eval] judge names another judge (here a user's pairwise function, on the held-out samples); a mistake in
    it is found before any work; a run dir from before the judge existed resumes, keeping its metrics."""
    fn = tmp_path / "judge.py"
    fn.write_text("def shorter(items):\n"
                  "    return [float(len(i['candidate']) < len(i['baseline'])) for i in items]\n")
    run = tmp_path / "j"
    summary = run_loop(config(models, run, **{"loop.rounds": 1, "eval.judge": f"pairwise:{fn}:shorter"}))
    c = json.loads((run / "round_1" / "compare.json").read_text())
    assert c["judge"] == f"pairwise:{fn}:shorter" and c["candidate"].endswith("round_1/eval_samples.jsonl")
    want = [float(a < b) for p in c["per_prompt"] for a, b in zip(p["candidate_lengths"], p["baseline_lengths"])]
    assert [v for p in c["per_prompt"] for v in p["preferences"]] == want
    assert summary["rounds"][1]["win_rate"] == c["win_rate"]
    for judge, phrase in [(f"pairwise:{fn}:nothing", "has no function 'nothing'"), ("nonsense", "eval.judge"),
                          (f"pairrm:{tmp_path / 'none'}", "none")]:
        with pytest.raises(MinalignError, match=phrase):
            run_loop(config(models, tmp_path / "bad", **{"loop.rounds": 1, "eval.judge": judge}))
        assert not (tmp_path / "bad").exists()
    # a run from before: loop.json without the new settings, round 1 measured without a comparison
    old = tmp_path / "old"
    run_loop(config(models, old, **{"loop.rounds": 1}))
    saved = json.loads((old / "loop.json").read_text())
    for section, key in [("eval", "judge"), ("select", "per_token"), ("dpo", "alpha"), ("dpo", "gamma")]:
        del saved["settings"][section][key]
    (old / "loop.json").write_text(json.dumps(saved))
    (old / "round_1" / "compare.json").unlink()
    metrics = json.loads((old / "round_1" / "metrics.json").read_text())
    for key in ("win_rate", "win_rate_interval", "lc_win_rate", "lc_win_rate_interval"):
        del metrics[key]
    (old / "round_1" / "metrics.json").write_text(json.dumps(metrics))
    again = run_loop(config(models, old, **{"loop.rounds": 1}))  # the comparison is made and added
    c = json.loads((old / "round_1" / "compare.json").read_text())
    assert again["rounds"][1] == {**metrics, **{k: c[k] for k in ("win_rate", "win_rate_interval", "lc_win_rate",
                                                                  "lc_win_rate_interval")}}
    assert json.loads((old / "round_1" / "metrics.json").read_text()) == again["rounds"][1]
    # eval.judge "rewards" said outright: the rewards the eval scores carry, as the default
    run_loop(config(models, tmp_path / "r", **{"loop.rounds": 1, "eval.judge": "rewards"}))
    c = json.loads((tmp_path / "r" / "round_1" / "compare.json").read_text())
    assert c["judge"] == "rewards" and c["candidate"].endswith("round_1/eval_scores.jsonl")
