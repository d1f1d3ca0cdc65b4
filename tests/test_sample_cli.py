"""sample.py end to end on a tiny random model: the output rows, determinism, resume after a kill, bad input,
and torchrun with two CPU processes giving the very file one process gives.

Most runs call sample.main in-process (no interpreter start-up); a few run the real command line.
"""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import minalign
import sample as sample_cli
from minalign import sample
from minalign.chat import render_prompt
from minalign.progress import Progress
from minalign.select import best_index

ROOT = Path(__file__).resolve().parents[1]
# Two cores: one thread per process, or OpenMP threads spin against each other (and against torchrun's ranks).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

PROMPTS = [
    {"prompt": "What is the quick brown fox?"},
    {"id": "b", "messages": [{"role": "user", "content": "hello world"}], "source": "chat"},
    {"prompt": "Why is the sky blue?", "source": "science"},
    {"id": 40, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "A dog?"}]},
    {"prompt": "the cat sat on the mat " * 6},
    {"prompt": "Tell me a story."},
    {"prompt": "a"},
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process runs use one thread too (see ENV)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_checkpoint(d: Path, tokenizer_dir: Path, padding_logit: float) -> Path:
    """A Merlinite-like checkpoint dir in d: the tiny tokenizer and a random tiny-mistral whose EOS is likely.

    The vocabulary is padded to a multiple of 8 as Merlinite's is (32005 ids, 32008 rows). Every embedding
    gets a constant first coordinate, so the hidden state has one too (about 8 after the final norm), and a
    weight on it sets a token's logit: <|endoftext|> gets 0.4 (a sample stops with a probability of about 6%
    a token at temperature 1, so runs end both ways, "stop" and "length"); the padding rows get
    padding_logit / 8.
    """
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    tok = minalign.load_tokenizer(d)
    cfg = minalign.get_config("tiny-mistral", vocab_size=-(-tok.vocab_size // 8) * 8)
    model = minalign.Transformer(cfg).init_weights(seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[tok.eos_id, 0] = 0.4
        model.lm_head.weight[tok.vocab_size:, 0] = padding_logit / 8
    minalign.save_model(model, d)
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, merlinite_tokenizer_dir):
    """Its padding rows are never sampled (logit -16), as in a trained model, where no target ever is one."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny_merlinite"), merlinite_tokenizer_dir, padding_logit=-16)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return minalign.load_tokenizer(model_dir)


def write_prompts(path: Path, rows) -> Path:
    """rows: dicts (written as JSON) or str (a raw line, e.g. malformed JSON)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def args_for(model_dir, prompts, out, *extra, **flags) -> list[str]:
    """sample.py arguments: small defaults for the tests, overridden by flags (seed=3 -> --seed 3)."""
    settings = {"template": "merlinite", "num_samples": 3, "max_new_tokens": 12, "temperature": 1.0,
                "top_p": 0.9, "top_k": 0, "seed": 0, "batch_size": 3, **flags}
    argv = ["--model", str(model_dir), "--prompts", str(prompts), "--out", str(out)]
    for k, v in settings.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv + list(extra)


def run_main(argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of sample_cli.main(argv) in-process."""
    capsys.readouterr()
    code = sample_cli.main(argv)
    return code, capsys.readouterr().err


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_same_file(got: bytes, want: bytes) -> None:
    """Byte equality; on a difference, say which row and field differ and show both values."""
    if got == want:
        return
    got_lines, want_lines = got.decode().splitlines(), want.decode().splitlines()
    assert len(got_lines) == len(want_lines), f"{len(got_lines)} rows, expected {len(want_lines)}"
    for k, (g, w) in enumerate(zip(got_lines, want_lines)):
        if g != w:
            g, w = json.loads(g), json.loads(w)
            for key in w:
                if key != "responses":
                    assert g.get(key) == w[key], f"row {k} {key}: {g.get(key)!r} != {w[key]!r}"
            for j, (rg, rw) in enumerate(zip(g["responses"], w["responses"], strict=True)):
                for key in rw:
                    assert rg[key] == rw[key], f"row {k} response {j} {key}:\n{rg[key]!r}\n!=\n{rw[key]!r}"
            assert list(g) == list(w), f"row {k}: keys {list(g)} != {list(w)}"
    raise AssertionError("the files differ in bytes only (formatting)")


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """(prompts file, output bytes) of one uninterrupted single-process run, shared by the comparisons."""
    d = tmp_path_factory.mktemp("reference")
    prompts = write_prompts(d / "prompts.jsonl", PROMPTS)
    assert sample_cli.main(args_for(model_dir, prompts, d / "out.jsonl")) == 0
    return prompts, (d / "out.jsonl").read_bytes()


def test_output_rows(tokenizer, reference):
    _, data = reference
    rows = [json.loads(line) for line in data.decode().splitlines()]
    assert [r["id"] for r in rows] == [1, "b", 3, 40, 5, 6, 7]  # input order; a missing id is the line number
    stop_ids = {tokenizer.eos_id}  # <|endoftext|>: Merlinite's EOS and its template's end token
    reasons = []
    for row, given in zip(rows, PROMPTS):
        expected_keys = ["id", "prompt"] + (["source"] if "source" in given else []) + ["prompt_token_ids",
                                                                                         "responses"]
        assert list(row) == expected_keys, row.keys()
        assert row["prompt"] == given.get("prompt", given.get("messages"))
        assert row.get("source") == given.get("source")
        assert row["prompt_token_ids"] == render_prompt(tokenizer, "merlinite", row["prompt"])
        assert len(row["responses"]) == 3
        for r in row["responses"]:
            assert list(r) == ["text", "token_ids", "logprobs", "finish_reason"], r.keys()
            ids, lps = r["token_ids"], r["logprobs"]
            assert all(type(i) is int for i in ids) and all(type(x) is float and x <= 0 for x in lps), r
            assert len(lps) == len(ids) >= 1
            reasons.append(r["finish_reason"])
            if r["finish_reason"] == "stop":
                assert ids[-1] in stop_ids and not stop_ids & set(ids[:-1]), ids
            else:
                assert r["finish_reason"] == "length" and len(ids) == 12 and not stop_ids & set(ids), r
            assert r["text"] == tokenizer.decode(ids)  # the special stop token decodes to nothing
    assert {"stop", "length"} <= set(reasons), reasons


def test_stop_strings_cut_the_text(model_dir, tokenizer, reference, tmp_path, capsys):
    prompts, _ = reference
    out = tmp_path / "out.jsonl"
    code, err = run_main(args_for(model_dir, prompts, out, "--stop", "e", "--stop", "o"), capsys)
    assert code == 0, err
    cut = 0
    for row in read_rows(out):
        for r in row["responses"]:
            full = tokenizer.decode(r["token_ids"])
            assert "e" not in r["text"] and "o" not in r["text"], r["text"]
            assert full.startswith(r["text"]), (full, r["text"])
            if r["finish_reason"] == "stop" and r["token_ids"][-1] != tokenizer.eos_id:
                cut += 1
                assert full[len(r["text"])] in "eo", (full, r["text"])
    assert cut, "no sample ended at a stop string"


def test_same_seed_same_file_other_seed_other_file(model_dir, reference, tmp_path, capsys):
    prompts, data = reference
    # --resume with no partial file is a fresh start
    code, err = run_main(args_for(model_dir, prompts, tmp_path / "same.jsonl", "--resume"), capsys)
    assert code == 0 and "resuming" not in err, err
    assert_same_file((tmp_path / "same.jsonl").read_bytes(), data)
    code, err = run_main(args_for(model_dir, prompts, tmp_path / "other.jsonl", seed=1), capsys)
    assert code == 0, err
    assert (tmp_path / "other.jsonl").read_bytes() != data


def test_batch_size_changes_no_sample(model_dir, reference, tmp_path, capsys):
    """Samples are keyed by prompt line, not by batch: tokens and texts are equal; a log-prob may differ in its
    last bits (floats summed in another order in another batch shape), so those compare with a tolerance."""
    prompts, data = reference
    out = tmp_path / "bs1.jsonl"
    code, err = run_main(args_for(model_dir, prompts, out, batch_size=1), capsys)
    assert code == 0, err
    for a, b in zip(read_rows(out), [json.loads(line) for line in data.decode().splitlines()], strict=True):
        for ra, rb in zip(a["responses"], b["responses"], strict=True):
            assert (ra["token_ids"], ra["text"], ra["finish_reason"]) == (rb["token_ids"], rb["text"],
                                                                          rb["finish_reason"]), (a["id"], ra, rb)
            worst = max(abs(x - y) for x, y in zip(ra["logprobs"], rb["logprobs"]))
            assert worst < 1e-5, (a["id"], ra["logprobs"], rb["logprobs"])


def interrupt_after(monkeypatch, prompts: int):
    """Make sample.py's sampler raise KeyboardInterrupt (what Ctrl-C does) once that many prompts are finished."""
    real = sample.stream

    def stream(*args, **kwargs):
        for k, item in enumerate(real(*args, **kwargs)):
            if k == prompts:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(sample, "stream", stream)


def test_resume_gives_the_uninterrupted_file(model_dir, reference, tmp_path, capsys, monkeypatch):
    prompts, data = reference
    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    interrupt_after(monkeypatch, 6)
    code, err = run_main(args_for(model_dir, prompts, out), capsys)
    assert code == 130 and "--resume" in err, err
    assert not out.exists()  # the output appears only when complete
    lines = partial.read_bytes().splitlines(keepends=True)
    header = json.loads(lines[0])
    assert header["format"] == sample.PARTIAL_FORMAT and header["settings"]["temperature"] == 1.0, header
    assert len(lines) == 1 + 6, lines  # the 6 prompts finished when Ctrl-C came are kept
    # A kill while the last of them were being written: one of those lines whole, the next torn.
    partial.write_bytes(b"".join(lines[:5]) + lines[5][:40])
    monkeypatch.undo()

    # Without --resume, an existing partial file is refused.
    code, err = run_main(args_for(model_dir, prompts, out), capsys)
    assert code == 2 and "pass --resume" in err and str(partial) in err, err
    assert err.count("\n") == 1, err

    code, err = run_main(args_for(model_dir, prompts, out, "--resume"), capsys)
    assert code == 0, err
    assert "resuming: 4 of 7 prompts are done" in err, err
    assert_same_file(out.read_bytes(), data)
    assert not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temp files left either


def test_resume_after_sigkill(model_dir, tmp_path, capsys):
    """A real kill -9 at whatever point the run has reached once a batch is on disk; --resume then writes the
    file an uninterrupted run writes."""
    rows = [{"prompt": f"question {k}: " + "the cat sat " * (k % 7)} for k in range(30)]
    prompts = write_prompts(tmp_path / "prompts.jsonl", rows)
    flags = dict(max_new_tokens=48, batch_size=2, num_samples=2)
    want = tmp_path / "want.jsonl"
    assert sample_cli.main(args_for(model_dir, prompts, want, **flags)) == 0
    out, partial = tmp_path / "out.jsonl", tmp_path / "out.jsonl.partial"
    proc = subprocess.Popen([sys.executable, "sample.py", *args_for(model_dir, prompts, out, **flags)], cwd=ROOT,
                            env=ENV, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None and not (partial.exists() and partial.read_bytes().count(b"\n") >= 2):
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill: give it more work"
    assert not out.exists()
    code, err = run_main(args_for(model_dir, prompts, out, "--resume", **flags), capsys)
    assert code == 0 and "resuming" in err, err
    assert_same_file(out.read_bytes(), want.read_bytes())
    assert not partial.exists()


def test_resume_refuses_other_settings(model_dir, reference, tmp_path, capsys, monkeypatch):
    prompts, _ = reference
    out = tmp_path / "out.jsonl"
    interrupt_after(monkeypatch, 1)
    assert run_main(args_for(model_dir, prompts, out), capsys)[0] == 130
    monkeypatch.undo()
    code, err = run_main(args_for(model_dir, prompts, out, "--resume", temperature=0.5, batch_size=2), capsys)
    assert code == 2, err
    assert "temperature 1.0 then, 0.5 now" in err and "batch" not in err, err  # the batch size may change
    assert (tmp_path / "out.jsonl.partial").exists() and not out.exists()

    # The prompts file changed: its hash no longer matches.
    write_prompts(prompts.with_name("more.jsonl"), PROMPTS + [{"prompt": "one more"}])
    code, err = run_main(args_for(model_dir, prompts.with_name("more.jsonl"), out, "--resume"), capsys)
    assert code == 2 and "prompts_sha256" in err, err


@pytest.mark.parametrize("bad, line, phrase", [
    ('{"prompt": "x"', 2, "malformed JSON"),
    ('["x"]', 2, "expected a JSON object"),
    ('{"id": 9}', 2, 'exactly one of "prompt"'),
    ('{"prompt": ["x"]}', 2, '"prompt" must be a string'),
    ('{"messages": [{"role": "user", "content": 3}]}', 2, "messages[0] must be"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', 2, "expected 'user'"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}', 2,
     "ends with a user message"),
    ('{"id": 1, "prompt": "same id as line 1"}', 2, "duplicate id 1 (first at line 1)"),
    ('{"prompt": "' + "the cat sat on the mat " * 30 + '"}', 2,  # the fix is named first: a smaller budget
     "exceeds the model's context of 1024: --max-new-tokens "),
])
def test_bad_rows_name_their_line(model_dir, tmp_path, capsys, bad, line, phrase):
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": "fine"}, bad, {"prompt": "fine too"}])
    # 1024 positions - 800 new tokens leaves 224 for a prompt: the default system prompt and a short question fit.
    code, err = run_main(args_for(model_dir, prompts, tmp_path / "out.jsonl", max_new_tokens=800), capsys)
    assert code == 2, err
    assert err.startswith(f"sample.py: error: {prompts}:{line}: ") and phrase in err, err
    assert err.count("\n") == 1, err  # one line, no traceback
    assert not list(tmp_path.glob("out.jsonl*"))


def test_skip_invalid_reports_and_skips(model_dir, tmp_path, capsys):
    rows = [{"prompt": "one"}, "{broken", {"prompt": "three"}, {"id": 4}, {"prompt": "five", "id": 1},
            {"prompt": "the cat sat on the mat " * 30}, {"prompt": "seven"}]
    prompts = write_prompts(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out.jsonl"
    code, err = run_main(args_for(model_dir, prompts, out, "--skip-invalid", max_new_tokens=800,
                                  num_samples=1, batch_size=4), capsys)
    assert code == 0, err
    skipped = [line for line in err.splitlines() if line.startswith("sample.py: skipped")]
    assert [s.split(":")[2] for s in skipped] == ["2", "4", "5", "6"], skipped
    assert all(s.startswith(f"sample.py: skipped {prompts}:") for s in skipped), skipped
    assert [r["id"] for r in read_rows(out)] == [1, 3, 7]
    assert "sample.py: prompts 3, samples 3, tokens " in err and ", skipped 4 -> " in err, err
    # every row skipped: an error, not an empty file
    none = write_prompts(tmp_path / "none.jsonl", ["{broken", {"id": 4}])
    code, err = run_main(args_for(model_dir, none, tmp_path / "none-out.jsonl", "--skip-invalid"), capsys)
    assert code == 2 and err.splitlines()[-1] == f"sample.py: error: --prompts {none}: no usable prompt (2 skipped)", err
    assert not list(tmp_path.glob("none-out.jsonl*"))


def test_missing_paths(model_dir, reference, tmp_path, capsys):
    prompts, _ = reference
    out = tmp_path / "out.jsonl"
    for argv, phrase in [
        (args_for(tmp_path / "nope", prompts, out), f"--model {tmp_path / 'nope'}: no such directory"),
        (args_for(model_dir, tmp_path / "nope.jsonl", out), f"--prompts {tmp_path / 'nope.jsonl'}: no such file"),
        (args_for(model_dir, prompts, tmp_path / "no" / "out.jsonl"), f"directory {tmp_path / 'no'} does not exist"),
    ]:
        code, err = run_main(argv, capsys)
        assert code == 2 and phrase in err and err.count("\n") == 1, err


@pytest.mark.parametrize("flags, phrase", [
    ({"template": "chatml"}, "argument --template: invalid choice: 'chatml'"),
    ({"top_p": 0}, "--top-p 0.0 is out of range"),
    ({"num_samples": 0}, "--num-samples 0 is out of range"),
])
def test_bad_flags(model_dir, reference, tmp_path, capsys, flags, phrase):
    """One line naming the flag (no usage block above it), status 2."""
    prompts, _ = reference
    code = sample_cli.main(args_for(model_dir, prompts, tmp_path / "out.jsonl", **flags))
    err = capsys.readouterr().err
    assert code == 2 and phrase in err and err.count("\n") == 1, err


def test_command_line_bad_row(model_dir, tmp_path):
    """The real command: status 2 and one line, no traceback."""
    bad = write_prompts(tmp_path / "bad.jsonl", [{"prompt": "x"}, "{nope"])
    run = subprocess.run([sys.executable, "sample.py", *args_for(model_dir, bad, tmp_path / "o.jsonl")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [f"sample.py: error: {bad}:2: malformed JSON (Expecting property name "
                                       f"enclosed in double quotes at column 2) (--skip-invalid skips bad rows)"]


def torchrun(script: str, argv: list[str], out: Path, want: bytes) -> list[str]:
    """Run script under torchrun with two CPU processes (gloo); check it wrote the file want and nothing else
    beside it (the rank partials merged and removed); return the summary line(s) it printed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *argv]
    run = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert_same_file(out.read_bytes(), want)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    return [line for line in run.stderr.splitlines() if line.startswith(f"{script}: ") and " tokens/s" in line]


def test_torchrun_two_processes_write_the_single_process_file(model_dir, reference, tmp_path):
    prompts, data = reference
    out = tmp_path / "out.jsonl"
    summary = torchrun("sample.py", args_for(model_dir, prompts, out, "--device", "cpu"), out, data)
    assert len(summary) == 1 and summary[0].startswith("sample.py: prompts 7, samples 21, tokens "), summary


def test_stop_tokens_of_each_template(tokenizer, mistral_tokenizer):
    assert sample.stop_token_ids(tokenizer, "merlinite") == [tokenizer.eos_id]  # <|endoftext|> is both
    assert sample.stop_token_ids(tokenizer, "mistral") == [2, tokenizer.eos_id]  # </s> ends the turn
    assert sample.stop_token_ids(mistral_tokenizer, "raw") == [2]


def test_progress_lines_when_not_a_terminal(monkeypatch):
    clock = iter(range(100))
    monkeypatch.setattr("minalign.progress.time.perf_counter", lambda: float(next(clock)))
    stream = io.StringIO()
    bar = Progress(total=10, stream=stream, log_every=5)  # start at t=0
    bar.advance(tokens=100)  # t=1: too early to draw
    bar.advance(items=4, tokens=300)  # t=2
    for _ in range(4):
        bar.advance(tokens=10)  # t=3..6: draws at 5 (5 s after the start)
    bar.advance(items=6)  # t=7: not due
    bar.close()  # t=8: always draws
    lines = stream.getvalue().splitlines()
    assert lines == ["4/10 prompts [########------------]  40% | 86 tokens/s | 0:05 elapsed, ETA 0:07",
                     "10/10 prompts [####################] 100% | 55 tokens/s | 0:08 elapsed, ETA 0:00"], lines


def test_progress_redraws_in_place_on_a_terminal(monkeypatch):
    clock = iter([0.0, 0.05, 0.2, 0.25, 0.4])
    monkeypatch.setattr("minalign.progress.time.perf_counter", lambda: next(clock))

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = Progress(total=2, stream=stream)
    bar.advance(tokens=10)  # 0.05 s: within 0.1 s of the start, no redraw
    bar.advance(items=1, tokens=10)  # 0.2 s: redraw
    bar.advance(items=1)  # 0.25 s: too soon
    bar.close()
    assert stream.getvalue() == ("\r\033[K1/2 prompts [##########----------]  50% | 100 tokens/s | 0:00 elapsed, ETA 0:00"
                                 "\r\033[K2/2 prompts [####################] 100% | 50 tokens/s | 0:00 elapsed, ETA 0:00"
                                 "\n"), repr(stream.getvalue())


def test_padding_rows_of_the_vocabulary_are_never_sampled(merlinite_tokenizer_dir, tmp_path, capsys):
    model = tiny_checkpoint(tmp_path, merlinite_tokenizer_dir, padding_logit=3)  # each about as likely as EOS
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    code, err = run_main(args_for(model, prompts, tmp_path / "out.jsonl"), capsys)
    assert code == 0, err
    vocab = minalign.load_tokenizer(model).vocab_size
    beyond = [i for row in read_rows(tmp_path / "out.jsonl") for r in row["responses"] for i in r["token_ids"]
              if i >= vocab]
    assert not beyond, f"sampled ids past the tokenizer's {vocab}: {beyond}"


def test_best_of_keeps_the_highest_reward(model_dir, reference, tmp_path, capsys):
    """--best-of N --reward SPEC: the same N samples as -n N, scored, the best kept (python and log-ratio specs)."""
    prompts, want = reference
    samples = [json.loads(line) for line in want.decode().splitlines()]  # -n 3, the same seed

    def best_of(out: str, *extra: str) -> list[str]:
        argv = args_for(model_dir, prompts, tmp_path / out)
        i = argv.index("--num-samples")
        return argv[:i] + argv[i + 2:] + list(extra)

    fn = tmp_path / "my_reward.py"
    fn.write_text("def vowels(rows):\n"
                  "    return [[sum(c in 'aeiou' for c in r['text']) for r in row['responses']] for row in rows]\n")
    assert sample_cli.main(best_of("best.jsonl", "--best-of", "3", "--reward", f"{fn}:vowels")) == 0
    got = read_rows(tmp_path / "best.jsonl")
    assert len(got) == len(samples)
    for row, full in zip(got, samples):
        rewards = [sum(c in "aeiou" for c in r["text"]) for r in full["responses"]]
        assert row["rewards"] == rewards
        pick = best_index({**full, "responses": [{**r, "reward": v} for r, v in zip(full["responses"], rewards)]})
        assert row["responses"] == [{**full["responses"][pick], "reward": rewards[pick]}]
    # a log-ratio spec, reference-free: the reward is Σ log π of the response, which the sampler also reports
    spec = f"log-ratio:policy={model_dir},policy_template=merlinite"
    assert sample_cli.main(best_of("lr.jsonl", "--best-of", "3", "--reward", spec)) == 0
    for row, full in zip(read_rows(tmp_path / "lr.jsonl"), samples):
        assert row["rewards"] == pytest.approx([sum(r["logprobs"]) for r in full["responses"]], abs=1e-3)
    # mistakes are named
    for extra, phrase in [(["--best-of", "3"], "--best-of needs --reward"),
                          (["--reward", "x:y"], "--reward is for --best-of"),
                          (["--best-of", "3", "--reward", "x:y", "-n", "2"], "leave out -n")]:
        assert sample_cli.main(best_of("o.jsonl", *extra)) == 2
        assert phrase in capsys.readouterr().err
    code, err = run_main(best_of("o2.jsonl", "--best-of", "3", "--reward", "no_such_module:f"), capsys)
    assert code == 2 and "cannot import 'no_such_module'" in err, err  # found before any sampling
    # a reward that fails on the rows: the samples are kept for a --resume with a mended reward
    (tmp_path / "broken.py").write_text("def broken(rows):\n    return [[0.0] for row in rows]\n")
    code, err = run_main(best_of("o3.jsonl", "--best-of", "3", "--reward", f"{tmp_path / 'broken.py'}:broken"), capsys)
    assert code == 2 and "broken: row 0 (id 1) has 3 responses but got [0.0]" in err, err
    assert len((tmp_path / "o3.jsonl.partial").read_text().splitlines()) > 1 and not (tmp_path / "o3.jsonl").exists()
    code, err = run_main(best_of("o3.jsonl", "--best-of", "3", "--reward", f"{fn}:vowels", "--resume"), capsys)
    assert code == 0 and (tmp_path / "o3.jsonl").read_bytes() == (tmp_path / "best.jsonl").read_bytes()


def test_outputs_that_would_destroy_work_are_refused(model_dir, reference, tmp_path, capsys):
    """--out that is the prompts file or a directory: refused before any work. A finished --out: refused, or with
    --resume left as it is ("nothing to do"), or redone with --overwrite."""
    prompts, want = reference
    copy = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    before = copy.read_bytes()
    for out, phrase in [(copy, f"--out {copy} is the --prompts file: it would be overwritten"),
                        (tmp_path, f"--out {tmp_path} is a directory")]:
        code, err = run_main(args_for(model_dir, copy, out), capsys)
        assert code == 2 and phrase in err and err.count("\n") == 1, err
    assert copy.read_bytes() == before
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"finished\n")
    code, err = run_main(args_for(model_dir, prompts, out), capsys)
    assert code == 2 and "exists (a finished run); --overwrite redoes it" in err, err
    code, err = run_main(args_for(model_dir, prompts, out, "--resume"), capsys)
    assert code == 0 and "is complete already; nothing to do" in err and out.read_bytes() == b"finished\n", err
    (tmp_path / "out.jsonl.partial").write_text('{"format": "of an unfinished earlier run"}\n')
    assert run_main(args_for(model_dir, prompts, out, "--overwrite"), capsys)[0] == 0  # from the start
    assert_same_file(out.read_bytes(), want)
    assert not (tmp_path / "out.jsonl.partial").exists()
