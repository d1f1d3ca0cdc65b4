"""One run per output: a second sample.py on the same --out, a second train.py into the same train.out and a
second loop into the same loop.out are refused at once, naming the path and the pid holding it, while the first
goes on to write what a solo run writes.

The first run is frozen (SIGSTOP) as soon as it holds its lock, so the second always meets it, however fast the
machine; then it is let go (SIGCONT) and finishes.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_loop import _artifacts, _toml, models, tiny_settings  # noqa: F401 (models: a fixture)
from tests.test_sample_cli import ENV, ROOT, args_for, model_dir, write_prompts  # noqa: F401 (model_dir: a fixture)
from tests.test_trainer import cli_args, sft_data  # noqa: F401 (sft_data: a fixture)
from tests.test_trainer import model_dir as train_model_dir  # noqa: F401


def launch(script: str, argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, script, *argv], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def freeze_once_locked(proc: subprocess.Popen, lock: Path, timeout: float = 120) -> None:
    """SIGSTOP proc as soon as the lock file names it (it writes its pid once it holds the lock)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            if lock.read_text().strip() == str(proc.pid):
                os.kill(proc.pid, signal.SIGSTOP)
                assert lock.read_text().strip() == str(proc.pid), "the first run let go before it was frozen"
                return
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    raise AssertionError(f"the first run never held {lock}: {proc.communicate()}")


def second_is_refused(first: subprocess.Popen, script: str, argv: list[str], name: str, path: Path) -> None:
    """Run the second command while the first is frozen: status 2, one line naming path and the first's pid."""
    try:
        began = time.monotonic()
        run = subprocess.run([sys.executable, script, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 2 and len(run.stderr.splitlines()) == 1, run.stderr
        assert f"error: {name} {path} is in use by another run (pid {first.pid}, holding " in run.stderr, run.stderr
        assert time.monotonic() - began < 60  # at once, not after waiting for the first
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err


def test_two_samplers_on_one_out(model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": f"{i}: tell me a story"} for i in range(24)])
    out = tmp_path / "samples.jsonl"
    first = launch("sample.py", args_for(model_dir, prompts, out, max_new_tokens=24))
    freeze_once_locked(first, out.with_name("samples.jsonl.lock"))
    second_is_refused(first, "sample.py", args_for(model_dir, prompts, out, seed=7), "--out", out)
    solo = tmp_path / "solo.jsonl"
    run = subprocess.run([sys.executable, "sample.py", *args_for(model_dir, prompts, solo, max_new_tokens=24)],
                         cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert out.read_bytes() == solo.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl", "samples.jsonl", "solo.jsonl"]


def test_two_trainers_in_one_run_dir(train_model_dir, sft_data, tmp_path):
    run_dir = tmp_path / "run"
    first = launch("train.py", cli_args(train_model_dir, sft_data, run_dir, steps=30, save_every=10))
    freeze_once_locked(first, tmp_path / "run.lock")
    second_is_refused(first, "train.py", cli_args(train_model_dir, sft_data, run_dir, steps=30, lr=2e-3),
                      "train.out", run_dir)
    solo = tmp_path / "solo"
    run = subprocess.run([sys.executable, "train.py", *cli_args(train_model_dir, sft_data, solo, steps=30,
                                                                   save_every=10)],
                         cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (run_dir / "final" / "model.safetensors").read_bytes() == (solo / "final" / "model.safetensors").read_bytes()
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (run_dir, solo)]
    assert losses[0] == losses[1] and len(losses[0]) == 30 // 5  # one run's records (log_every 5), not two mixed


def test_two_loops_in_one_run_dir(models, tmp_path):
    def argv(out: Path, **extra) -> list[str]:
        over = {**tiny_settings(models, out), "loop.rounds": 1, **extra}
        return ["--config", str(config)] + [a for k, v in over.items() for a in (f"--{k}", _toml(v))]
    config = tmp_path / "loop.toml"
    config.write_text('[loop]\nrecipe = "rejection-sampling"\n')
    run_dir = tmp_path / "run"
    first = launch("train.py", argv(run_dir))
    freeze_once_locked(first, tmp_path / "run.lock")
    second_is_refused(first, "train.py", argv(run_dir, **{"sample.temperature": 0.5}), "loop.out", run_dir)
    solo = tmp_path / "solo"
    run = subprocess.run([sys.executable, "train.py", *argv(solo)], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    a, b = _artifacts(run_dir), _artifacts(solo)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a if "json" in k), \
        [k for k in a if a[k] != b.get(k)]
