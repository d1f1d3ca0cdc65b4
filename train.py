"""train.py: the alignment loop (rounds of sample → score → select → train), or one SFT/DPO training run.

    python train.py                                         # the CPU demo: configs/demo.toml, into runs/demo/
    python train.py --recipe iterative-dpo                  # the demo with iterative DPO
    torchrun --nproc_per_node 8 train.py --config configs/merlinite_pt.toml --policy.path DIR ...
    python train.py --config configs/sft_tiny.toml          # one training run (a config without [loop])
    torchrun --nproc_per_node 8 train.py --config configs/dpo_tiny.toml --train.parallel fsdp --train.lr 5e-7

A config with a [loop] table runs the loop (minalign/loop.py: [loop], [policy], [prompts], [sample], [eval],
[reward], [select] and the trainer's [data], [train], [dpo]); it writes round_k/ dirs, summary.json, summary.png
and a `best` link into loop.out, and the same command started again resumes it at the first unfinished stage.
A [demo] table builds the CPU demo's task and models first (minalign/demo.py). A config without [loop] is a
single training run (minalign/train.py: [model], [data], [train], [dpo]) into train.out, resumed with --resume
(or --train.resume true). `--section.key value` flags override the file.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from minalign import cli, demo, distributed
from minalign.errors import ConfigError
from minalign.loop import run_loop
from minalign.loop_setup import RECIPES, LoopConfig, load_loop_config
from minalign.settings import read_settings, read_toml, settings_help
from minalign.train import TrainConfig, load_config, train

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.toml"


@dataclass
class DemoConfig:
    demo: demo.DemoSection = field(default_factory=demo.DemoSection)


def _overrides(p: argparse.ArgumentParser, rest: list[str]) -> list[tuple[str, str]]:
    """The (section.key, value) pairs of `--section.key value` (or `--section.key=value`) flags."""
    overrides = []
    while rest:
        flag = rest.pop(0)
        key = flag[2:] if flag.startswith("--") else ""
        if "=" in key:
            key, value = key.split("=", 1)
        elif rest:
            value = rest.pop(0)
        else:
            p.error(f"{flag}: expected --section.key value")
        if "." not in key:
            p.error(f"{flag}: expected --section.key value (e.g. --train.lr 1e-5)")
        overrides.append((key.replace("-", "_"), value))
    return overrides


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """--config FILE (default: the demo), --recipe, --resume, and any number of --section.key value pairs."""
    p = cli.parser(__doc__, epilog="settings of a config with a [loop] table (--section.key value; default, meaning):\n"
                   f"{settings_help(LoopConfig())}\n\nsettings of the demo's setup (a [demo] table):\n"
                   f"{settings_help(DemoConfig())}\n\nsettings of a single training run (a config without "
                   f"[loop]):\n{settings_help(TrainConfig())}")
    p.add_argument("--config", default=str(DEMO_CONFIG),
                   help="TOML settings (the default is the CPU demo; '' = none: the flags alone, a single run)")
    p.add_argument("--recipe", choices=RECIPES, help="the loop's recipe: short for --loop.recipe (default: the config's)")
    p.add_argument("--resume", action="store_true", help="a single training run: continue the run in train.out "
                   "(--train.resume true); a loop resumes by itself")
    args, rest = p.parse_known_args(argv)
    overrides = _overrides(p, rest)
    if args.recipe:
        overrides.append(("loop.recipe", args.recipe))
    tables = read_toml(args.config) if args.config else {}
    args.loop = "loop" in tables
    if args.recipe and not args.loop:
        p.error(f"--recipe: {args.config} has no [loop] table (it is a single training run)")
    demo_overrides = [(k, v) for k, v in overrides if k.startswith("demo.")]
    args.demo = None
    if "demo" in tables or demo_overrides:
        args.demo = read_settings(DemoConfig(), {"demo": tables.pop("demo", {})}, demo_overrides).demo
    overrides = [(k, v) for k, v in overrides if not k.startswith("demo.")]
    if args.resume and not args.loop:
        overrides.append(("train.resume", "true"))
    args.cfg = (load_loop_config if args.loop else load_config)(tables, overrides)
    args.device = args.cfg.train.device or None
    args.out = args.cfg.run_dir if args.loop else args.cfg.train.out
    return args


def run(args: argparse.Namespace, rank: int, world: int, device) -> None:
    if args.demo is not None:
        if world > 1:
            raise ConfigError("the demo runs in one process: python train.py, not torchrun")
        demo.build(args.demo, log=lambda text: print(f"loop: {text}", file=sys.stderr, flush=True))
    if args.loop:
        run_loop(args.cfg, rank, world, device)
    else:
        train(args.cfg, rank, world, device)
    distributed.barrier()


def main(argv: list[str] | None = None) -> int:
    """Run train.py; returns the exit status (0 done, 2 bad input or settings, 130 interrupted)."""
    def interrupted(args: argparse.Namespace) -> str:
        if args.loop:
            return f"the finished stages are kept in {args.out}; run the same command again to resume"
        return "the checkpoints in train.out are kept; rerun with --resume to continue"
    return cli.main("train.py", argv, parse_args, run, kept="checkpoints", interrupted=interrupted)


if __name__ == "__main__":
    distributed.exit(main())
