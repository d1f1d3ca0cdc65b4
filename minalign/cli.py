"""What the command lines (sample.py, score.py, train.py) share: a stage's flags built from its config dataclass,
--help that lists every setting once with its default and meaning, and the one place where minalign's errors
become one line on stderr and exit status 2 (`main`). Library code raises (minalign.errors) and never exits.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Callable

from safetensors import SafetensorError

from minalign import distributed
from minalign.errors import ConfigError, MinalignError
from minalign.settings import set_path, stage_flags


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after a flag's help, once: not where the help says its default already, nor for
    a flag without one (None, an off switch, an empty list); an epilog as written (the settings table)."""

    def _get_help_string(self, action):
        d = action.default
        if "default" in (action.help or "") or d is None or d is False or d == [] or d == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)

    def _fill_text(self, text, width, indent):
        return text


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is a ConfigError: one line (no usage block above it) and status 2 from `main`, as
    every other mistake is."""

    def error(self, message):
        raise ConfigError(f"{message} (--help lists the flags)")


def parser(doc: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A command's argument parser, described by its docstring's first line ("sample.py: what it does")."""
    return _Parser(description=doc.split("\n")[0].split(": ", 1)[1], epilog=epilog, formatter_class=_HelpFormatter)


def stage_parser(doc: str, config_type) -> argparse.ArgumentParser:
    """The parser of a stage command: one flag per field of its config dataclass (settings.stage_flags), with the
    field's default and its comment as help."""
    p = parser(doc)
    for fl in stage_flags(config_type):
        text = fl.options.get("help", fl.help).replace("%", "%%")  # argparse %-formats a help string
        kwargs = {**fl.options, "help": text, "dest": ".".join(fl.path)}
        if fl.default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = fl.default
        if "choices" not in kwargs and fl.kind is not bool:
            kwargs.setdefault("metavar", fl.path[-1].upper())  # MAX_NEW_TOKENS, not SAMPLE.MAX_NEW_TOKENS
        if fl.kind is bool:
            kwargs["action"] = "store_true"
        elif fl.kind is list:
            kwargs.update(nargs="+", action="extend")
        elif fl.kind in (int, float):
            kwargs.setdefault("type", fl.kind)
        p.add_argument(*fl.names, **kwargs)
    return p


def parse_stage(p: argparse.ArgumentParser, config_type, argv: list[str] | None):
    """argv parsed by a stage_parser into the stage's config (a ConfigError for a bad flag)."""
    args = p.parse_args(argv)
    values = vars(args)
    required = {".".join(fl.path): values[".".join(fl.path)] for fl in stage_flags(config_type)
                if fl.default is dataclasses.MISSING and len(fl.path) == 1}
    cfg = config_type(**required)
    for fl in stage_flags(config_type):
        set_path(cfg, fl.path, values[".".join(fl.path)])
    return cfg


def main(prog: str, argv: list[str] | None, parse_args: Callable, run: Callable, *, kept: str,
         interrupted: str | Callable[[object], str] | None = None) -> int:
    """A command's main: parse argv into its config, join torchrun's process group (if any), run(cfg, rank, world,
    device) — the config has .out, and .device when the command runs a model.

    Returns the exit status: 0 when run returns, 2 with one line on stderr for a MinalignError (or an OSError: a full disk,
    a read-only dir), 130 on Ctrl-C. kept: what an interrupted run keeps in its partial file ("finished
    prompts"), for the message; interrupted: the whole message after "interrupted; " instead (or a function of
    the config giving it), for a command that keeps no partial file.
    """
    try:
        cfg = parse_args(argv)  # --help prints and exits (0) in here
    except MinalignError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        rank, world, device = distributed.init(getattr(cfg, "device", None))  # (the report has no device)
    except MinalignError as e:  # before the process group exists (a bad MINALIGN_HEARTBEAT_TIMEOUT)
        print(f"{prog}: [rank {os.environ.get('RANK')}] error: {e}", file=sys.stderr)
        return 2
    where = f"[rank {rank}] " if world > 1 else ""
    try:
        run(cfg, rank, world, device)
        return 0
    except (MinalignError, OSError, SafetensorError) as e:  # safetensors' writer raises its own error for a full
        # disk (files it reads are checked before any work): what was finished is kept
        print(f"{prog}: {where}error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if callable(interrupted):
            interrupted = interrupted(cfg)
        print(f"{prog}: {where}interrupted; " + (interrupted or f"{kept} are kept in the partial file beside "
              f"{cfg.out}, rerun with --resume to continue"), file=sys.stderr)
        return 130
