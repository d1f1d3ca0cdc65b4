"""The errors minalign raises for a problem its user can fix. One base class: the message is one line naming where
the problem is (a file:line, a settings key or flag, a directory); only the command-line entry points (cli.main)
turn it into `prog: error: <message>` and exit status 2. Library code raises these and never prints or exits.

    MinalignError
    ├── ConfigError      a setting or a flag out of range or missing (names the key: "train.lr", "--top-p") — also
    │                    a ValueError
    ├── DataError        a row of an input file (names path:line)           — also a ValueError
    ├── CheckpointError  a checkpoint dir (names the file or the keys)      — also a ValueError
    ├── RunError         an output or run dir: in use, finished, or holding another run's files
    ├── RewardError      a reward source that cannot be imported, or whose answer is malformed — also a ValueError
    └── TrainingError    training cannot go on (a non-finite loss); nothing of the failed step is saved

All but RunError and TrainingError are also ValueErrors, so a caller that checks a value (a prompt rendered in a
template, a config.json, a setting) catches one family.
"""
from __future__ import annotations

import os


class MinalignError(Exception):
    """A problem the user can fix; str() is one line that says where and what."""


class ConfigError(MinalignError, ValueError):
    """A setting (TOML key, override or flag) that is missing, of the wrong type or out of range."""


class DataError(MinalignError, ValueError):
    """A bad line of an input file; str() is 'path:line: what is wrong'."""

    def __init__(self, path: str | os.PathLike, line: int, message: str):
        super().__init__(f"{path}:{line}: {message}")
        self.path, self.line, self.message = str(path), line, message


class CheckpointError(MinalignError, ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file or keys at fault."""


class RunError(MinalignError):
    """An output that another run owns, that is finished already, or that holds files of a run with other
    settings."""


class TrainingError(MinalignError):
    """Training cannot go on (a non-finite loss): nothing of the failed step is saved."""


class RewardError(MinalignError, ValueError):
    """A reward source that cannot be found or imported, or whose answer is malformed (names the source)."""
