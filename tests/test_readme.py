"""The README's example commands, run exactly as written (after the Quickstart: on a reduced demo setup at
runs/demo/setup), each ending with status 0; and the figures of what the demo's reward picks, by hand."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from minalign import demo
from tests.test_demo import SMALL
from tests.test_sample_cli import ENV, ROOT

SCRIPTS = ("train.py", "sample.py", "score.py")


def readme_commands() -> list[str]:
    """Every command of the README's bash blocks that runs on the demo's files (runs/demo/... or a tiny config),
    continuation lines joined and trailing comments dropped; the demo itself (`python train.py` alone) and what reads
    its loop's rounds are left out (tests/test_loop.py runs the loop)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split(" # ")[0].strip()
            needs_loop = re.search(r"runs/demo/(rejection-sampling|iterative-dpo)", command)  # the full demo's
            if re.search(r"runs/demo/|configs/(sft|dpo)_tiny", command) and not needs_loop and \
                    command.split()[0] in ("python", "torchrun"):
                commands.append(command)
    return commands


def test_the_readme_names_commands_on_the_demo_files():
    commands = readme_commands()
    assert len(commands) >= 8, commands
    assert {c for c in commands if "torchrun" in c} and {c for c in commands if "score.py" in c}, commands


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A checkout as a new user has it after the Quickstart: the scripts and configs, and runs/demo/setup."""
    d = tmp_path_factory.mktemp("checkout")
    for name in (*SCRIPTS, "configs"):
        os.symlink(ROOT / name, d / name)
    demo.build(demo.DemoSection(out=str(d / "runs" / "demo" / "setup"), **SMALL), log=lambda _: None)
    return d


def test_readme_commands_run_as_written(checkout):
    for command in readme_commands():
        argv = shlex.split(command)
        argv[0] = sys.executable if argv[0] == "python" else str(Path(sys.executable).with_name("torchrun"))
        run = subprocess.run(argv, cwd=checkout, env=ENV, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"{command}\n{run.stderr[-3000:]}"
    assert (checkout / "runs" / "sft-tiny" / "final").is_dir() and (checkout / "runs" / "dpo-tiny" / "final").is_dir()
    assert (checkout / "runs" / "dpo-fsdp" / "final").is_dir()
    scores = [json.loads(line) for line in (checkout / "runs" / "scores-demo.jsonl").read_text().splitlines()]
    assert all("reward" in r for row in scores for r in row["responses"])


def test_check_rewards_counts_what_the_reward_put_first(tmp_path):
    """Round 0: a right answer drawn on 2 of 3 prompts; the top reward is right on one, wrong ("13") on the other."""
    def row(prompt, texts, rewards):
        return {"prompt": prompt, "responses": [{"text": t, "reward": r} for t, r in zip(texts, rewards)]}
    (tmp_path / "round_0").mkdir()
    rows = [row("What is 7 plus 5?", ["12", "13"], [1.0, -3.0]), row("What is 2 times 3?", ["6", "7"], [-1.0, 2.0]),
            row("What is 1 minus 4?", ["3", "-2"], [0.5, 0.0])]
    (tmp_path / "round_0" / "eval_scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "round_1").mkdir()  # not evaluated yet: no line
    assert demo.check_rewards(tmp_path) == [{"round": 0, "prompts": 3, "right_drawn": 2, "top_right": 1,
                                            "top_wrong": [("What is 2 times 3?", "7")]}]
