"""train.py / minalign.train on tiny models: parallel settings take the same step, resume continues exactly,
SFT and DPO learn, the exported model is what transformers computes, and bad input is reported.

Equal-step tolerance: after one AdamW step (lr 1e-3, so each weight moves ~1e-3) the parameters of every
setting agree with the single-process, 2-micro-batch step within 1e-6 absolute (float summation order only).
"""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minalign
import train as train_cli
from minalign import examples as train_data, train_state
from minalign import train as trainer
from minalign.errors import MinalignError
from minalign.errors import TrainingError
from minalign.train import load_config
from tests.test_sample_cli import ENV, ROOT
from tests.test_sample_cli import one_thread  # noqa: F401 (autouse: one torch thread, as in the subprocesses)

WORDS = "the cat dog bird sat ran on over mat log tree quick brown lazy fox hello world".split()
PARAM_TOL = 1e-6
DPO_PARAM_TOL = 1e-5  # see test_dpo_parallel_settings_take_the_same_step


def tiny_dir(d: Path, tokenizer_dir: Path, kind: str = "mistral", seed: int = 0) -> Path:
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    cfg = minalign.get_config(f"tiny-{kind}", vocab_size=minalign.load_tokenizer(d).vocab_size)
    minalign.save_model(minalign.Transformer(cfg).init_weights(seed=seed), d)
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, merlinite_tokenizer_dir):
    return tiny_dir(tmp_path_factory.mktemp("policy"), merlinite_tokenizer_dir)


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentence(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    rows = []
    for i in range(16):
        if i % 4 == 3:  # multi-turn: the second user turn is context, both replies are targets
            rows.append({"messages": [{"role": "user", "content": sentence(i, 3)},
                                      {"role": "assistant", "content": "the quick fox"},
                                      {"role": "user", "content": sentence(i + 1, 2)},
                                      {"role": "assistant", "content": "the lazy dog"}]})
        else:
            rows.append({"prompt": sentence(i, 2 + i % 5), "response": "the quick brown fox sat on the mat"})
    return write_rows(tmp_path_factory.mktemp("sft") / "sft.jsonl", rows)


@pytest.fixture(scope="module")
def dpo_data(tmp_path_factory):
    rows = []
    for i in range(16):
        prompt = sentence(i, 2 + i % 4)
        if i % 2:
            rows.append({"prompt": prompt, "chosen": "hello world", "rejected": "lazy bird ran over the log"})
        else:  # UltraFeedback-binarized: full conversations ending with the reply
            user = [{"role": "user", "content": prompt}]
            rows.append({"prompt": prompt, "chosen": user + [{"role": "assistant", "content": "hello world"}],
                         "rejected": user + [{"role": "assistant", "content": "the dog sat on a tree"}]})
    d = tmp_path_factory.mktemp("dpo")
    return write_rows(d / "dpo.jsonl", rows)


def overrides(model_dir, data, out, mode="sft", **train) -> list[tuple[str, str]]:
    values = {"model.path": str(model_dir), "model.template": "mistral", "data.path": str(data),
              "train.out": str(out), "train.mode": mode, "data.max_length": 64, "data.max_prompt_length": 48,
              "train.batch_size": 4, "train.micro_batch_size": 2, "train.lr": 1e-3, "train.steps": 1,
              "train.warmup_steps": 0, **{f"train.{k}": v for k, v in train.items()}}
    return [(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in values.items()]


def config(model_dir, data, out, mode="sft", **train):
    return load_config(None, overrides(model_dir, data, out, mode, **train))


def final_weights(out: Path) -> dict:
    return load_file(out / "final" / "model.safetensors")


def assert_same_weights(a: dict, b: dict, tol=PARAM_TOL):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=0, msg=k)


def torchrun_train(argv: list[str]):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *argv]
    run = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stderr


def cli_args(model_dir, data, out, **train) -> list[str]:
    argv = ["--config", str(ROOT / "configs" / "sft_tiny.toml"), "--model.path", str(model_dir),
            "--data.path", str(data), "--train.out", str(out), "--model.template", "mistral", "--data.max_length", "64",
            "--data.max_prompt_length", "48", "--train.lr", "1e-3", "--train.steps", "1", "--train.warmup_steps", "0"]
    for k, v in train.items():
        argv += [f"--train.{k}", str(v)]
    return argv


def test_parallel_settings_take_the_same_step(model_dir, sft_data, tmp_path):
    """2 micro-batches × 2 == one batch of 4 == activation checkpointing == DDP on 2 ranks == FSDP2 on 2 ranks."""
    base = trainer.train(config(model_dir, sft_data, tmp_path / "accum"))
    want = final_weights(tmp_path / "accum")
    base_norm = json.loads((tmp_path / "accum" / "metrics.jsonl").read_text().splitlines()[0])["grad_norm"]
    one = trainer.train(config(model_dir, sft_data, tmp_path / "one", micro_batch_size=4))
    assert one["losses"] == pytest.approx(base["losses"], rel=1e-6)
    assert_same_weights(final_weights(tmp_path / "one"), want)
    trainer.train(config(model_dir, sft_data, tmp_path / "ac", activation_checkpointing=True))
    assert_same_weights(final_weights(tmp_path / "ac"), want)
    moved = sum((want[k] - v).abs().max().item() > 1e-4 for k, v in load_file(model_dir / "model.safetensors").items())
    assert moved > 10  # the step did change the weights
    for parallel in ("ddp", "fsdp"):
        out = tmp_path / parallel
        log = torchrun_train(cli_args(model_dir, sft_data, out, micro_batch_size=1, parallel=parallel))
        assert_same_weights(final_weights(out), want)
        record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert record["loss"] == pytest.approx(base["losses"][0], rel=1e-6), log
        # AdamW's first step is blind to a global gradient scale (g / |g|): the grad norm is not
        assert record["grad_norm"] == pytest.approx(base_norm, rel=1e-5), log


def read_cache(data: Path) -> tuple[dict, torch.Tensor, list[int]]:
    rows = [json.loads(line) for line in train_data.reference_cache_path(data).read_text().splitlines()]
    return rows[0], torch.tensor([[r["chosen"], r["rejected"]] for r in rows[1:]]), [r["line"] for r in rows[1:]]


def test_dpo_parallel_settings_take_the_same_step(model_dir, dpo_data, tmp_path):
    """One DPO step: DDP and FSDP2 on 2 ranks (1 pair per micro-batch, 2 accumulated) == one process (2 pairs
    per micro-batch, 2 accumulated), same global batch of 4 pairs: the same loss and grad norm (rel 1e-6), the
    same reference cache (1e-5 absolute on log-prob sums of about -20..-60; the batch shapes, so the summation
    orders, differ) and the same parameters within 1e-5 absolute (1% of this lr): the first DPO step's gradient
    is a difference of the chosen and rejected gradients, and where it nearly cancels (|g| ~ adam_eps) AdamW's
    g / (|g| + eps) turns float noise of ~1e-3 relative into ~1e-6 of weight (seen: 1.3e-6 on one element).
    15 pairs: the reference pass splits them 8/7, so under FSDP rank 1 makes one dummy forward."""
    rows = dpo_data.read_text().splitlines(keepends=True)[:15]
    runs = {}
    for name in ("single", "ddp", "fsdp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "dpo.jsonl").write_text("".join(rows))  # each run its own reference cache
        parallel = {"micro_batch_size": 2} if name == "single" else {"micro_batch_size": 1, "parallel": name}
        runs[name] = overrides(model_dir, tmp_path / name / "dpo.jsonl", tmp_path / name / "run", "dpo", **parallel)
    base = trainer.train(load_config(None, runs["single"]))
    want = final_weights(tmp_path / "single" / "run")
    single = json.loads((tmp_path / "single" / "run" / "metrics.jsonl").read_text().splitlines()[0])
    header, ref, lines = read_cache(tmp_path / "single" / "dpo.jsonl")
    assert len(lines) == 15 and ref.isfinite().all()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "tests.test_trainer", json.dumps(runs["ddp"]), json.dumps(runs["fsdp"])]
    run = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for name in ("ddp", "fsdp"):
        got_header, got_ref, got_lines = read_cache(tmp_path / name / "dpo.jsonl")
        assert {**got_header, "data_sha256": None} == {**header, "data_sha256": None} and got_lines == lines
        torch.testing.assert_close(got_ref, ref, atol=1e-5, rtol=0, msg=name)
        assert_same_weights(final_weights(tmp_path / name / "run"), want, tol=DPO_PARAM_TOL)
        record = json.loads((tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()[0])
        assert record["loss"] == pytest.approx(base["losses"][0], rel=1e-6), name
        assert record["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-6), name
        assert record["reward_accuracy"] == 0.0 and record["reward_margin"] == 0.0  # policy == reference


def test_resume_continues_with_identical_losses(model_dir, dpo_data, tmp_path):
    straight = trainer.train(config(model_dir, dpo_data, tmp_path / "a", "dpo", steps=4, warmup_steps=1))
    first = trainer.train(config(model_dir, dpo_data, tmp_path / "b", "dpo", steps=4, warmup_steps=1, stop_after=2))
    assert first["final"] is None and (tmp_path / "b" / "checkpoints" / "step_000002").is_dir()
    with pytest.raises(MinalignError, match="resume"):  # a run dir is never overwritten by accident
        trainer.train(config(model_dir, dpo_data, tmp_path / "b", "dpo", steps=4, warmup_steps=1))
    with pytest.raises(MinalignError, match="train.lr"):
        trainer.train(config(model_dir, dpo_data, tmp_path / "b", "dpo", steps=4, warmup_steps=1, lr=2e-3,
                             resume=True))
    # More steps would stretch the cosine over them and raise the learning rate again: refused, with the way on.
    with pytest.raises(MinalignError, match=r"\(train.steps\); resume with the same ones \(train.steps 4 then: the "
                                       r"learning-rate schedule is laid over it; to train on, start a new run from "):
        trainer.train(config(model_dir, dpo_data, tmp_path / "b", "dpo", steps=8, warmup_steps=1, resume=True))
    metrics = tmp_path / "b" / "metrics.jsonl"  # a record torn by a full disk or a power loss: cut, as partials are
    metrics.write_bytes(metrics.read_bytes() + b'{"step": 3, "lo')
    rest = trainer.train(config(model_dir, dpo_data, tmp_path / "b", "dpo", steps=4, warmup_steps=1, resume=True))
    assert first["losses"] + rest["losses"] == straight["losses"]
    assert_same_weights(final_weights(tmp_path / "b"), final_weights(tmp_path / "a"), tol=0)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_after_a_kill_in_the_final_export_writes_final(model_dir, sft_data, tmp_path, monkeypatch):
    """Killed after the last checkpoint, before final/ is in place: a resume writes final/ (it used to refuse,
    "has done 1 steps already", leaving no way to get final/ but by hand)."""
    real = minalign.save_model

    def killed(model, path, *args, **kwargs):
        if Path(path).name == ".tmp-final":
            raise KeyboardInterrupt
        return real(model, path, *args, **kwargs)

    monkeypatch.setattr(minalign, "save_model", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(config(model_dir, sft_data, tmp_path / "run"))
    assert not (tmp_path / "run" / "final").exists() and (tmp_path / "run" / "latest.json").is_file()
    monkeypatch.setattr(minalign, "save_model", real)
    result = trainer.train(config(model_dir, sft_data, tmp_path / "run", resume=True))
    assert result["losses"] == [] and result["final"] == tmp_path / "run" / "final"
    assert_same_weights(final_weights(tmp_path / "run"),
                        load_file(tmp_path / "run" / "checkpoints" / "step_000001" / "model.safetensors"), tol=0)
    assert (tmp_path / "run" / "final" / "tokenizer.model").is_file()
    with pytest.raises(MinalignError, match="has done 1 steps already"):  # with final/ in place: nothing left to do
        trainer.train(config(model_dir, sft_data, tmp_path / "run", resume=True))


def test_keep_checkpoints_prunes_the_oldest_by_step_number(model_dir, tmp_path):
    """Past step 999999 the names outgrow the zero padding: pruning by name used to delete step_1000000, the
    newer of the two it had to choose from, and keep step_999999."""
    model = minalign.load_model(model_dir)
    optimizer = torch.optim.AdamW(model.parameters())
    for step in (999_999, 1_000_000, 1_000_001):
        train_state.save_checkpoint(tmp_path, step, model, optimizer, {}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1000000", "step_1000001"]
    assert train_state.latest_checkpoint(tmp_path).name == "step_1000001"


def test_sft_learns_and_exports_for_transformers(model_dir, sft_data, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sft"
    result = trainer.train(config(model_dir, sft_data, out, steps=30, lr=3e-3, warmup_steps=3, save_every=10))
    losses = result["losses"]
    assert losses[-1] < 0.4 * losses[0], losses
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000020", "step_000030"]
    final = out / "final"
    ours = minalign.load_model(final)
    assert minalign.load_tokenizer(final).vocab_size == minalign.load_tokenizer(model_dir).vocab_size
    hf = AutoModelForCausalLM.from_pretrained(final).eval()
    tokens = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= record.keys()


def test_dpo_learns_and_caches_reference(model_dir, dpo_data, tmp_path, capsys, monkeypatch):
    result = trainer.train(config(model_dir, dpo_data, tmp_path / "dpo", "dpo", steps=20, lr=3e-3, warmup_steps=2))
    losses = result["losses"]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at the first step
    assert losses[-1] < 0.5 * losses[0], losses
    last = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["reward_accuracy"] == 1.0 and last["reward_margin"] > 0
    cache = train_data.reference_cache_path(dpo_data)
    assert json.loads(cache.read_text().splitlines()[0])["reference"] == str(model_dir.resolve())
    assert len(cache.read_text().splitlines()) == 1 + 16
    # The second run with the same data and reference reads the cache: no reference model is loaded.
    loads = []
    real = minalign.load_model
    monkeypatch.setattr(minalign, "load_model", lambda path, **kw: loads.append(Path(path)) or real(path, **kw))
    trainer.train(config(model_dir, dpo_data, tmp_path / "again", "dpo", steps=1))
    assert loads.count(model_dir) == 1  # the policy only
    assert "from the cache" in capsys.readouterr().err


def test_simpo_never_loads_a_reference(model_dir, dpo_data, tmp_path, monkeypatch):
    """dpo.loss_type simpo is reference-free: the policy is the one model loaded, no reference log-prob is
    computed or cached, and it learns (its loss falls; chosen is rewarded above rejected)."""
    cache = train_data.reference_cache_path(dpo_data)
    cached = cache.read_bytes() if cache.exists() else None
    loads = []
    real = minalign.load_model
    monkeypatch.setattr(minalign, "load_model", lambda path, **kw: loads.append(Path(path)) or real(path, **kw))
    monkeypatch.setattr(trainer, "reference_logprobs", lambda *a, **kw: pytest.fail("a reference pass"))
    over = overrides(model_dir, dpo_data, tmp_path / "simpo", "dpo", steps=20, lr=3e-3, warmup_steps=2)
    cfg = load_config(None, over + [("dpo.loss_type", '"simpo"'), ("dpo.beta", "2.0"), ("dpo.gamma", "0.5")])
    losses = trainer.train(cfg)["losses"]
    assert [p for p in loads if tmp_path / "simpo" not in p.parents] == [model_dir]  # (and its own checkpoints)
    assert (cache.read_bytes() if cache.exists() else None) == cached  # nothing written beside the data
    assert losses[-1] < 0.5 * losses[0], losses
    last = json.loads((tmp_path / "simpo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["reward_accuracy"] == 1.0 and last["reward_margin"] > 0
    with pytest.raises(MinalignError, match="simpo is reference-free: leave model.reference empty"):
        load_config(None, over + [("dpo.loss_type", '"simpo"'), ("model.reference", str(model_dir))])


def test_mixtral_router_loss_is_trained_and_logged(merlinite_tokenizer_dir, sft_data, tmp_path):
    (tmp_path / "moe").mkdir()
    moe = tiny_dir(tmp_path / "moe", merlinite_tokenizer_dir, "mixtral")
    trainer.train(config(moe, sft_data, tmp_path / "run", steps=2))
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 1.0 < record["aux_loss"] < 4.0  # E·Σ f·P: 2 (top-2) for perfectly even routing


def test_bad_input(model_dir, tmp_path, capsys, monkeypatch):
    empty = write_rows(tmp_path / "empty.jsonl", [])
    with pytest.raises(MinalignError, match="no usable rows"):
        trainer.train(config(model_dir, empty, tmp_path / "r0"))
    missing = write_rows(tmp_path / "missing.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                                     {"prompt": "a", "chosen": "b"}])
    with pytest.raises(MinalignError, match=r"missing.jsonl:2: .*rejected"):
        trainer.train(config(model_dir, missing, tmp_path / "r1", "dpo"))
    rows = [{"prompt": sentence(i, 2), "chosen": "the cat", "rejected": "the dog"} for i in range(4)]
    rows += [{"prompt": "x", "chosen": "same", "rejected": "same"},
             {"prompt": sentence(1, 90), "chosen": "the cat " * 40, "rejected": "the dog"}]
    data = write_rows(tmp_path / "odd.jsonl", rows)
    cfg = config(model_dir, data, tmp_path / "r2", "dpo")
    cfg.data.max_length, cfg.data.max_prompt_length = 96, 80
    examples, stats = train_data.load_examples(cfg.data, cfg.train.mode, cfg.model.template, minalign.load_tokenizer(model_dir))
    assert (stats.skipped_identical, stats.truncated_prompts, stats.truncated_responses) == (1, 1, 1)
    assert len(examples) == 5 and max(e.length() for e in examples) == 96
    long = examples[-1]
    assert len(long.prompt) == 80 and long.prompt[0] == 1  # cut from the left, the BOS kept
    trainer.train(cfg)
    assert "1 with chosen identical to rejected skipped; truncated: 1 prompts, 1 responses" in capsys.readouterr().err
    # A non-finite loss stops the run before the optimizer step, with nothing saved.
    monkeypatch.setattr(trainer, "sft_loss", lambda sums, n: sums.sum() * float("nan"))
    with pytest.raises(TrainingError, match="step 1: non-finite loss"):
        trainer.train(config(model_dir, write_rows(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}] * 4),
                             tmp_path / "r3"))
    assert not (tmp_path / "r3" / "latest.json").exists() and not (tmp_path / "r3" / "checkpoints").exists()


def test_command_line(model_dir, sft_data, tmp_path, capsys):
    capsys.readouterr()
    assert train_cli.main(cli_args(model_dir, sft_data, tmp_path / "run", steps=2, log_every=1)) == 0
    assert (tmp_path / "run" / "final" / "tokenizer.model").is_file()
    start = capsys.readouterr().err.splitlines()[0]  # SFT has no chosen and rejected to count
    assert start.startswith(f"train.py: sft on 16 rows of {sft_data} (0 invalid skipped; truncated: ") and \
        "identical" not in start, start
    code = train_cli.main(cli_args(model_dir, sft_data, tmp_path / "x", nonsense=1))
    err = capsys.readouterr().err
    assert code == 2 and "unknown config key train.nonsense" in err and err.count("\n") == 1, err
    assert load_config(str(ROOT / "configs" / "dpo_tiny.toml")).dpo.beta == 0.1


def test_configuration_mistakes_are_one_line_and_status_2(model_dir, sft_data, tmp_path):
    """A template the tokenizer lacks tokens for, a model dir that is not there: one line, status 2, through the
    real command line (it used to be a traceback, status 1, calling the model dir a "tokenizer directory")."""
    nowhere = tmp_path / "no-model"
    for argv, line in [
        (cli_args(model_dir, sft_data, tmp_path / "a") + ["--model.template", "raw", "--model.path", str(nowhere)],
         f"train.py: error: model.path {nowhere}: no such directory (expected an HF checkpoint dir: config.json, "
         f"weights and tokenizer files)"),
        (cli_args(model_dir, sft_data, tmp_path / "b") + ["--model.reference", str(nowhere)],
         f"train.py: error: model.reference {nowhere}: no such directory"),
        (cli_args(model_dir, sft_data, tmp_path / "b") + ["--model.reference", str(sft_data)],
         f"train.py: error: model.reference {sft_data}: not a directory"),
        (cli_args(model_dir, sft_data, tmp_path / "b") + ["--data.max_length", "5000"],  # the tiny model has 1024
         f"train.py: error: data.max_length 5000 exceeds the context of 1024 tokens of {model_dir}: give "
         f"data.max_length 1024 or less"),
    ]:
        run = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert run.returncode == 2 and len(run.stderr.splitlines()) == 1 and run.stderr.startswith(line), run.stderr
    plain = tmp_path / "plain"  # a tokenizer without Merlinite's <|user|>, <|assistant|>, ...
    plain.mkdir()
    for f in model_dir.iterdir():
        if f.name not in ("added_tokens.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
            shutil.copy(f, plain / f.name)
    argv = cli_args(plain, sft_data, tmp_path / "c") + ["--model.template", "merlinite"]
    run = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert run.returncode == 2 and len(run.stderr.splitlines()) == 1, run.stderr
    assert run.stderr.startswith(f"train.py: error: model.template 'merlinite' does not fit the tokenizer of {plain}: "
                                 f"chat template 'merlinite' needs token(s) "), run.stderr
    assert not (tmp_path / "c").exists()


if __name__ == "__main__":  # torchrun ... -m tests.test_trainer OVERRIDES...: one trainer.train per JSON override list
    from minalign import distributed

    rank, world, device = distributed.init("cpu")
    for arg in sys.argv[1:]:
        trainer.train(load_config(None, [tuple(kv) for kv in json.loads(arg)]), rank, world, device)
    distributed.barrier()
    distributed.exit(0)


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(model_dir, sft_data, tmp_path, capsys, monkeypatch):
    """safetensors' writer raises its own error on a full disk (ENOSPC), not an OSError; and a bad row's hint names
    train.py's own switch."""
    from safetensors import SafetensorError
    real, calls = train_state.save_file, []

    def save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(*args, **kwargs)
    monkeypatch.setattr(train_state, "save_file", save_file)
    capsys.readouterr()
    assert train_cli.main(cli_args(model_dir, sft_data, tmp_path / "run", steps=4, save_every=2)) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == ("train.py: error: Error while serializing: I/O error: No space left on device "
                                    "(os error 28)"), err
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 2
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "a"}])
    assert train_cli.main(cli_args(model_dir, bad, tmp_path / "r2")) == 2
    assert capsys.readouterr().err.rstrip().endswith("(--data.skip_invalid true skips bad rows)")


@pytest.mark.parametrize("key, value, phrase", [
    ("train.adam_eps", "-1.0", "train.adam_eps must be > 0"),
    ("train.adam_betas", '["a", "b"]', "train.adam_betas: expected a list of floats"),
    ("train.seed", str(2**63), "train.seed must be in [0, 2147483648)"),
    ("train.lr", "inf", "train.lr must be finite"),
    ("train.device", "cuda", "train.device cuda: torch sees no CUDA device"),
    ("train.weight_decay", "nan", "train.weight_decay must be finite"),
])
def test_bad_settings_are_one_line(model_dir, sft_data, tmp_path, capsys, key, value, phrase):
    if key == "train.device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    capsys.readouterr()
    assert train_cli.main(cli_args(model_dir, sft_data, tmp_path / "run") + [f"--{key}", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train.py: error: ") and phrase in err, err
    assert not (tmp_path / "run").exists()


MIXED_PRECISION = '''
import json, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import minalign
from minalign.logprobs import sequence_logprobs
from minalign.losses import sft_loss
from minalign.parallel import wrap_model

dist.init_process_group("gloo")
prompts, responses = json.loads(sys.argv[3]), json.loads(sys.argv[4])


def step(model, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = sequence_logprobs(model, prompts, responses)
        loss = sft_loss(out.sums, int(out.counts.sum()))
    dtype = model.lm_head.weight.dtype  # as the log-prob head used it (the root stays gathered after forward)
    loss.backward()
    grads = torch.cat([(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).flatten()
                       for p in model.parameters()])
    return loss.item(), grads.norm().item(), dtype


sharded = wrap_model(minalign.load_model(sys.argv[2], dtype=torch.float32), "fsdp", False, 2, torch.device("cpu"),
                     mixed_precision=True)
plain = minalign.load_model(sys.argv[2], dtype=torch.float32)
fsdp, autocast = step(sharded, False), step(plain, True)
if dist.get_rank() == 0:
    print(json.dumps({"fsdp": [fsdp[0], fsdp[1], str(fsdp[2])], "autocast": [autocast[0], autocast[1]]}))
dist.destroy_process_group()
'''


def test_fsdp_mixed_precision_matches_autocast(model_dir, tmp_path):
    """FSDP2's bf16 MixedPrecisionPolicy (what train.py uses with parallel fsdp and mixed_precision on CUDA) on 2 gloo
    ranks: the weights are gathered in bf16 (half autocast's bytes), and the SFT loss and gradient norm equal one
    process's bf16 autocast over the same fp32 weights within bf16 tolerance."""
    script = tmp_path / "mp.py"
    script.write_text(MIXED_PRECISION)
    tok = minalign.load_tokenizer(model_dir)
    prompts = [tok.encode(sentence(i, 12), bos=True) for i in range(4)]
    responses = [tok.encode(sentence(i + 7, 9)) for i in range(4)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(ROOT), str(model_dir), json.dumps(prompts), json.dumps(responses)]
    run = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    (loss, norm, dtype), (want_loss, want_norm) = got["fsdp"], got["autocast"]
    assert dtype == "torch.bfloat16", dtype  # the gathered lm_head: bf16, not fp32
    print(f"FSDP2 bf16 policy: loss {loss:.6g}, grad norm {norm:.6g}; autocast: {want_loss:.6g}, {want_norm:.6g}")
    assert loss == pytest.approx(want_loss, rel=1e-2) and norm == pytest.approx(want_norm, rel=2e-2), got
