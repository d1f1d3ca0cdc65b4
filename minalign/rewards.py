"""Reward sources: the interface every reward meets, and the three kinds minalign has.

The score stage hands a reward source the rows of a samples file (sample.py's output),

    {"id", "prompt": str | [{"role", "content"}, ...], "responses": [{"text", "token_ids", ...}, ...], ...}

and takes back one float per response, higher is better:

    source(rows: list[dict]) -> list[list[float]]

A source reads what it needs: the log-ratio reward (logratio.LogRatioReward, r = β·(log π_policy − log π_ref))
scores each response's `token_ids`; the PairRM ranker (pairrm.PairRMReward) reads `prompt` and the responses'
`text` and returns each response's score against the others of its prompt; a user's `module:function` is any
function of that signature (Snorkel's premise: specialised enterprise reward models). `reward_source(kind,
options)` builds any of the three from a config table, `from_spec` from a command-line spec, and `call_source`
calls one and checks its answer's shape. Errors are RewardErrors naming the source.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import sys
from pathlib import Path
from typing import Callable

from minalign.errors import RewardError
from minalign.logratio import LogRatioReward
from minalign.pairrm import PairRMReward

REWARD_KINDS = ("log-ratio", "pairrm", "python")
RewardSource = Callable[[list[dict]], list[list[float]]]
# How a spec's text values become LogRatioReward's arguments.
_LOG_RATIO_TYPES = {"policy": str, "reference": str, "policy_template": str, "reference_template": str,
                    "normalize": str, "beta": float, "batch_tokens": int,
                    "sampler_end_ids": lambda v: [int(i) for i in v.split("+")]}
SPEC_HELP = ("'log-ratio:policy=DIR,policy_template=T,reference=DIR,reference_template=T[,normalize=sum,beta=1,"
             "sampler_end_ids=32000]' (T: the template each model was trained on), 'pairrm:DIR', or a Python function 'module:function' / "
             "'path/to/file.py:function' taking rows and returning one float per response")


def load_function(spec: str) -> Callable:
    """The function a 'module:function' or 'path/to/file.py:function' spec names (importing runs that code: it
    is the user's own; a file is imported once per process, like a module). RewardError naming the spec when it
    cannot be found or its import fails."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise RewardError(f"reward {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    try:
        if where.endswith(".py"):
            path = Path(where).resolve()
            if not path.is_file():
                raise RewardError(f"reward {spec!r}: {where}: no such file")
            key = f"minalign_user_{hashlib.sha256(str(path).encode()).hexdigest()[:16]}_{path.stem}"
            module = sys.modules.get(key)
            if module is None:
                module_spec = importlib.util.spec_from_file_location(key, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[key] = module  # before running it: dataclasses and pickling look the module up
                try:
                    module_spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[key]
                    raise
        else:
            module = importlib.import_module(where)
    except ImportError as e:
        raise RewardError(f"reward {spec!r}: cannot import {where!r} ({e}); is it on PYTHONPATH?") from None
    except RewardError:
        raise
    except Exception as e:  # the user's module failed while being imported
        raise RewardError(f"reward {spec!r}: importing {where} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {where} has no function {name!r}")
    return fn


def reward_source(kind: str, options: dict) -> RewardSource:
    """A reward source (rows -> one float per response) of a kind and its options:
    log-ratio: LogRatioReward's arguments (policy, reference, templates, beta, normalize, ...);
    pairrm: path (+ batch_size, dtype, device); python: function ('module:function')."""
    options = dict(options)
    if kind == "log-ratio":
        if not options.get("policy") or not options.get("policy_template"):
            raise RewardError("a log-ratio reward needs policy and policy_template (and reference with "
                             "reference_template, unless reference-free)")
        return LogRatioReward(options.pop("policy"), options.pop("reference", None), **options)
    if kind == "pairrm":
        if not options.get("path"):
            raise RewardError("a pairrm reward needs path (the PairRM checkpoint dir)")
        return PairRMReward(options.pop("path"), **options)
    if kind == "python":
        if set(options) != {"function"}:
            raise RewardError(f"a python reward takes one option, function ('module:function'); got {sorted(options)}")
        return load_function(options["function"])
    raise RewardError(f"unknown reward kind {kind!r}; known: {', '.join(REWARD_KINDS)}")


def parse_spec(spec: str) -> tuple[str, dict]:
    """(kind, options) of a --reward spec (SPEC_HELP lists the forms); RewardError naming the spec."""
    head, sep, rest = spec.partition(":")
    if head == "pairrm":
        if not rest:
            raise RewardError(f"reward {spec!r}: expected 'pairrm:DIR'")
        return "pairrm", {"path": rest}
    if head != "log-ratio":
        if not sep:
            raise RewardError(f"reward {spec!r}: expected one of {SPEC_HELP}")
        return "python", {"function": spec}
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in _LOG_RATIO_TYPES:
            raise RewardError(f"reward {spec!r}: {item!r} is not one of {', '.join(k + '=' for k in _LOG_RATIO_TYPES)}")
        try:
            options[key] = _LOG_RATIO_TYPES[key](value)
        except ValueError:
            raise RewardError(f"reward {spec!r}: bad value for {key}: {value!r}") from None
    if "policy" not in options:
        raise RewardError(f"reward {spec!r}: a log-ratio reward needs policy=DIR (and reference=DIR)")
    return "log-ratio", options


def from_spec(spec: str, **kwargs) -> RewardSource:
    """A reward source from a --reward spec; kwargs (dtype, device, batch_size for PairRM, batch_tokens for the
    log-ratio) go to the model-based kinds."""
    kind, options = parse_spec(spec)
    return reward_source(kind, options if kind == "python" else {**options, **kwargs})


def call_source(source: RewardSource, rows: list[dict], name: str) -> list[list[float]]:
    """source(rows), checked: one list per row, one finite number per response (bools count as 0/1).
    RewardError naming the source (name) and the first row and response at fault."""
    scores = source(rows)
    scores = scores.tolist() if hasattr(scores, "tolist") else scores  # a numpy array or a tensor
    if not isinstance(scores, (list, tuple)) or len(scores) != len(rows):
        got = f"{len(scores)} items" if isinstance(scores, (list, tuple)) else type(scores).__name__
        raise RewardError(f"reward {name}: expected one list of scores per row ({len(rows)} rows), got {got}")
    out = []
    for k, (row, values) in enumerate(zip(rows, scores)):
        n = len(row.get("responses", ()))
        values = values.tolist() if hasattr(values, "tolist") else values
        if not isinstance(values, (list, tuple)) or len(values) != n:
            raise RewardError(f"reward {name}: row {k} (id {row.get('id')!r}) has {n} responses but got {values!r}")
        for j, v in enumerate(values):
            ok = isinstance(v, numbers.Real) and math.isfinite(v)  # numpy's scalars are Reals; a bool is an int
            if not ok:
                raise RewardError(f"reward {name}: row {k} (id {row.get('id')!r}) responses[{j}]: {v!r} is not a "
                                 f"finite number")
        out.append([float(v) for v in values])
    return out


def score_rows(source: RewardSource, rows: list[dict], name: str) -> list[dict]:
    """rows with each response gaining its "reward" from source (checked: call_source)."""
    scores = call_source(source, rows, name)
    return [{**row, "responses": [{**r, "reward": v} for r, v in zip(row["responses"], values)]}
            for row, values in zip(rows, scores)]
