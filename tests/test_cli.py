"""What every command line shares: --help that lists every setting once, with its default and meaning; one thread
for a tiny model on the CPU; an install that pulls only what the product runs."""
import dataclasses
import importlib.metadata
import re
import subprocess
import sys

import pytest
import torch

import minalign
import kernels
from minalign import distributed, settings
from minalign.loop_setup import LoopConfig
from minalign.train import TrainConfig
from tests.test_sample_cli import ENV, ROOT


def help_text(script: str) -> str:
    run = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env={**ENV, "COLUMNS": "200"},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_train_help_lists_every_setting_with_its_default_and_meaning():
    """Generated from the dataclasses (the comment on each field's line), so it cannot drift from the code."""
    text = help_text("train.py")
    for cfg in (LoopConfig(), TrainConfig()):
        for f in dataclasses.fields(cfg):
            section = getattr(cfg, f.name)
            meaning = settings.field_help(section)
            for g in dataclasses.fields(section):
                assert meaning.get(g.name), f"{type(section).__name__}.{g.name} has no comment to explain it"
                flag = f"--{f.name}.{g.name} {settings.toml_text(getattr(section, g.name))}"
                assert re.search(rf"^  {re.escape(flag)} +{re.escape(meaning[g.name])}$", text, re.M), flag
    assert '--train.lr 1e-05' in text and '--reward.policy_template ""' in text and "--dpo.loss_type \"sigmoid\"" in text


@pytest.mark.parametrize("script", ["sample.py", "score.py", "train.py"])
def test_help_gives_each_default_once(script):
    """argparse's "(default: X)" came on top of help texts that said their default already, and "(default: None)"
    after flags that have none."""
    text = help_text(script).split("settings of a config")[0]
    flags = re.split(r"\n  (?=-)", text.split("options:")[1])
    assert len(flags) >= 4
    for flag in flags:
        assert flag.count("default") <= 1 and "(default: None)" not in flag and "(default: False)" not in flag, flag


def test_a_tiny_model_runs_on_one_cpu_thread(monkeypatch):
    """torch's threads spin-wait for each other on a tiny model's small matmuls: one thread, unless the user chose."""
    threads = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        model = minalign.Transformer(minalign.get_config("tiny-mistral"))
        assert distributed.fit_threads(model) is model and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's (or torchrun's) choice stands
        distributed.fit_threads(model)
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        with torch.device("meta"):  # a 7B model keeps torch's threads
            big = minalign.Transformer(minalign.get_config("mistral-7b-v0.1"))
        distributed.fit_threads(big)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_triton_is_a_test_dependency_only():
    """A CPU install would pull ~1 GB of triton that only the tests' interpreter runs; CUDA builds of torch bring it."""
    requires = importlib.metadata.requires("minalign")
    product = [r for r in requires if "extra ==" not in r]
    assert not any(r.startswith("triton") for r in product), product
    assert any(r.startswith("triton") and 'extra == "test"' in r for r in requires), requires
    assert any(r.startswith("matplotlib") for r in product)


def test_without_triton_the_fused_path_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    for name in ("kernels", "kernels.logprob"):  # imported anew (the package holds logprob once imported)
        monkeypatch.delitem(sys.modules, name, raising=False)
    kernels._fused_kernel.cache_clear()
    try:
        assert kernels._fused_kernel() is None
        err = capsys.readouterr().err
        assert "the fused log-prob kernel needs triton" in err and "`pip install triton`" in err, err
    finally:
        kernels._fused_kernel.cache_clear()
