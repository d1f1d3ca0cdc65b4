"""Rewards for sampled responses: the DPO log-ratio reward, and the interface every reward source meets.

The log-ratio reward (RewardBench's "DPO reward"; Merlinite-7B-pt's reward with policy = Mixtral-8x7B-Instruct,
reference = Mixtral-8x7B):

    r(x, y) = β · (Σ_t log π_policy(y_t | x, y_<t) − Σ_t log π_ref(y_t | x, y_<t))      over the response tokens

`normalize="mean"` divides each sum by the number of response tokens; `reference=None` (reference-free) drops the
second sum. Each model reads the prompt x in its own chat template (Mixtral-Instruct `mistral`, `[INST] … [/INST]`;
the base model `raw`), while the response y is the very token ids the sampler drew, the same for both models —
re-tokenising the text can give other ids. So the two models must share a tokenizer (checked).

A reply that ended with the sampler's end-of-turn token (Merlinite's `<|endoftext|>`, id 32000, which Mixtral's
32000-id vocabulary does not even have) can be scored as ending with each scoring template's own end token
(`</s>` for mistral and raw): pass that id in `sampler_end_ids`.

Reward sources. The score stage hands a reward source the rows of a samples file (sample.py's output),

    {"id", "prompt": str | [{"role", "content"}, ...], "responses": [{"text", "token_ids", ...}, ...], ...}

and takes back one float per response, higher is better:

    source(rows: list[dict]) -> list[list[float]]

A source reads what it needs: `LogRatioReward` scores each response's `token_ids`; the PairRM ranker
(minalign/pairrm.py) reads `prompt` and the responses' `text` and returns each response's score against the
others of its prompt; a user's `module:function` is any function of that signature (Snorkel's premise:
specialised enterprise reward models). `LogRatioReward.score(rows)` also returns the log-prob sums each reward
came from. `reward_source(kind, options)` builds any of the three from a config table, `from_spec` from a
command-line spec, and `call_source` calls one and checks its answer's shape.

Memory: the two models are never loaded at once (Mixtral-8x7B is ~94 GB in bf16): the policy scores every row
and is freed, then the reference does. score.py adds resume, torchrun and FSDP around the same pieces.
"""
from __future__ import annotations

import gc
import hashlib
import importlib
import importlib.util
import math
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import minalign
from minalign import distributed
from minalign.chat import end_token_id, render_prompt
from minalign.checkpoint import check_checkpoint
from minalign.config import ModelConfig
from minalign.data import as_messages, messages_of
from minalign.logprobs import pack_by_length, sequence_logprobs
from minalign.tokenizer import Tokenizer

__all__ = ["NORMALIZE", "REWARD_KINDS", "reward_source", "parse_spec", "from_spec", "load_function", "call_source",
           "score_rows",
           "LogRatioReward", "Scorer", "log_ratio", "check_same_tokenizer", "prompt_messages",
           "response_token_ids", "cut_batches", "batch_logprobs", "release_memory", "scored_row"]

NORMALIZE = ("sum", "mean")

# A sequence to score: (prompt ids in one model's template, response ids).
Sequence = tuple[list[int], list[int]]


def log_ratio(policy_logprob: float, reference_logprob: float | None, num_tokens: int, *, beta: float = 1.0,
              normalize: str = "sum") -> float:
    """β·(policy − reference) log-prob of one response, summed or averaged over its num_tokens tokens.

    reference_logprob None: reference-free, β · policy log-prob alone.
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    diff = policy_logprob - (0.0 if reference_logprob is None else reference_logprob)
    return beta * (diff / num_tokens if normalize == "mean" else diff)


def check_same_tokenizer(policy: Tokenizer, policy_dir, reference: Tokenizer, reference_dir) -> None:
    """ValueError naming both directories unless the tokenizers give every id the same meaning (sentencepiece
    model bytes and added tokens): the response ids are scored by both models as they are."""
    if policy.sp.serialized_model_proto() != reference.sp.serialized_model_proto():
        what = "their tokenizer.model files differ"
    elif policy.added_tokens != reference.added_tokens:
        diff = sorted(set(policy.added_tokens.items()) ^ set(reference.added_tokens.items()), key=lambda kv: kv[1])
        what = f"their added tokens differ ({', '.join(f'{c!r}={i}' for c, i in diff[:6])})"
    else:
        return
    raise ValueError(f"the policy {policy_dir} and the reference {reference_dir} must share a tokenizer (both score "
                     f"the same response token ids), but {what}")


def prompt_messages(row: dict) -> list[dict]:
    """The prompt of a samples row as messages: "prompt" is a string (one user message) or a messages list."""
    if "prompt" not in row:
        raise ValueError(f'a samples row needs a "prompt" (a string or a list of messages); got keys {sorted(row)}')
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return as_messages(prompt)
    if not isinstance(prompt, list):
        raise ValueError(f'"prompt" must be a string or a list of messages, got {type(prompt).__name__}')
    return messages_of(prompt, "prompt")


def response_token_ids(row: dict) -> list[list[int]]:
    """The token ids of each response of a samples row; ValueError if "responses" or a "token_ids" is malformed."""
    responses = row.get("responses")
    if not isinstance(responses, list) or not responses:
        raise ValueError(f'a samples row needs a non-empty "responses" list; got '
                         f'{"no such key" if "responses" not in row else type(responses).__name__}')
    out = []
    for j, r in enumerate(responses):
        ids = r.get("token_ids") if isinstance(r, dict) else None
        if not (isinstance(ids, list) and ids and all(type(i) is int for i in ids)):
            raise ValueError(f'responses[{j}] needs "token_ids", a non-empty list of integers')
        out.append(ids)
    return out


@dataclass
class Scorer:
    """One model of the pair before it is loaded: its directory, template, tokenizer and config."""

    path: Path
    template: str
    tokenizer: Tokenizer
    config: ModelConfig
    end_id: int | None  # the token that ends a reply in this template, for sampler_end_ids

    @classmethod
    def open(cls, path, template: str) -> Scorer:
        """Read config.json and the tokenizer of checkpoint dir path; ValueError (or OSError) naming what is wrong,
        including a template whose special tokens the tokenizer lacks."""
        path = Path(path)
        config = check_checkpoint(path)  # config.json against the weights' headers: bad files found now
        tokenizer = minalign.load_tokenizer(path)
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                             f"{config.vocab_size}: they do not belong together")
        try:
            end_id = end_token_id(tokenizer, template)  # renders a reply: fails if the template's tokens are missing
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return cls(path, template, tokenizer, config, end_id)

    def sequences(self, row: dict, sampler_end_ids=()) -> list[Sequence]:
        """(prompt ids, response ids) of each response of a samples row as this model scores them; ValueError
        for a malformed row, an id outside the tokenizer or a sequence longer than the model's context."""
        prompt = render_prompt(self.tokenizer, self.template, prompt_messages(row))
        vocab, context = self.tokenizer.vocab_size, self.config.max_position_embeddings
        out = []
        for j, ids in enumerate(response_token_ids(row)):
            if ids[-1] in sampler_end_ids and self.end_id is not None:
                ids = ids[:-1] + [self.end_id]  # the reply ends; in this template's words
            bad = next((i for i in ids if not 0 <= i < vocab), None)
            if bad is not None:
                hint = " (the sampling template's end token? give it as a sampler end id)" if bad == ids[-1] else ""
                raise ValueError(f"responses[{j}]: token id {bad} is outside the tokenizer of {self.path} "
                                 f"({vocab} ids){hint}")
            if len(prompt) + len(ids) > context:
                raise ValueError(f"responses[{j}]: {len(prompt)} prompt ({self.template} template) + {len(ids)} "
                                 f"response tokens exceed the context of {context} of {self.path}")
            out.append((prompt, ids))
        return out

    def load(self, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
        """The model, for inference."""
        return distributed.fit_threads(minalign.load_model(self.path, dtype=dtype, device=device,
                                                           check_finite=True).eval())


def cut_batches(sequences: list[Sequence], batch_tokens: int) -> list[list[int]]:
    """Indices of (prompt, response) sequences packed by total length: logprobs.pack_by_length."""
    return pack_by_length([len(p) + len(r) for p, r in sequences], batch_tokens)


def batch_logprobs(model, sequences: list[Sequence]) -> list[float]:
    """Σ log π(response | prompt) of each sequence, computed in one forward (as float, in order)."""
    prompts, responses = zip(*sequences)
    padded = len(sequences) * max(len(p) + len(r) for p, r in sequences)
    # A budget of exactly the padded size: sequence_logprobs packs the batch into one forward, which FSDP's
    # lockstep counts on (every rank must run as many forwards as every other).
    with torch.no_grad():
        sums, _ = sequence_logprobs(model, list(prompts), list(responses), batch_tokens=padded)
    return sums.cpu().tolist()


def release_memory() -> None:
    """Give a dropped model's memory back before the next one is loaded (call after `del model`)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def scored_row(row: dict, policy: list[float], reference: list[float] | None, counts: list[int], *,
               beta: float = 1.0, normalize: str = "sum") -> dict:
    """row with each response gaining "reward", "policy_logprob", "reference_logprob" (not when reference-free)
    and "num_tokens"; all other fields as they were, in their order."""
    responses = []
    for j, r in enumerate(row["responses"]):
        ref = None if reference is None else reference[j]
        r = {**r, "reward": log_ratio(policy[j], ref, counts[j], beta=beta, normalize=normalize),
             "policy_logprob": policy[j]}
        if ref is not None:
            r["reference_logprob"] = ref
        responses.append({**r, "num_tokens": counts[j]})
    return {**row, "responses": responses}


class LogRatioReward:
    """The log-ratio reward source: r = β·(log π_policy(y|x) − log π_ref(y|x)) per response (see the module doc).

    policy, reference: HF checkpoint dirs sharing a tokenizer (reference None: reference-free); each reads the
    prompt in its template, which has no default (a model read in another template gives a wrong number).
    """

    def __init__(self, policy, reference=None, *, policy_template: str, reference_template: str | None = None,
                 beta: float = 1.0, normalize: str = "sum",
                 sampler_end_ids=(), batch_tokens: int = 16384, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu"):
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        if reference is not None and not reference_template:
            raise ValueError("a log-ratio reward with a reference needs reference_template (the template the "
                             "reference model was trained on)")
        self.scorers = [Scorer.open(policy, policy_template)]
        if reference is not None:
            self.scorers.append(Scorer.open(reference, reference_template))
            check_same_tokenizer(self.scorers[0].tokenizer, policy, self.scorers[1].tokenizer, reference)
        self.beta, self.normalize, self.sampler_end_ids = beta, normalize, tuple(sampler_end_ids)
        self.batch_tokens, self.dtype, self.device = batch_tokens, dtype, device

    def score(self, rows: list[dict]) -> list[dict]:
        """The rows with each response's reward and the log-prob sums it came from (see scored_row)."""
        counts = []
        for k, row in enumerate(rows):
            try:
                counts.append([len(ids) for ids in response_token_ids(row)])
            except ValueError as e:
                raise ValueError(f"row {k}: {e}") from None
        per_model = []  # per model: a list of log-prob sums per row
        for scorer in self.scorers:
            seqs, owner = [], []  # every response of every row, and its (row, response) index
            for k, row in enumerate(rows):
                try:
                    found = scorer.sequences(row, self.sampler_end_ids)
                except ValueError as e:
                    raise ValueError(f"row {k}: {e}") from None
                seqs += found
                owner += [(k, j) for j in range(len(found))]
            sums = [[0.0] * len(c) for c in counts]
            model = scorer.load(self.dtype, self.device)
            for batch in cut_batches(seqs, self.batch_tokens):
                for i, value in zip(batch, batch_logprobs(model, [seqs[i] for i in batch])):
                    sums[owner[i][0]][owner[i][1]] = value
            del model
            release_memory()
            per_model.append(sums)
        reference = per_model[1] if len(per_model) > 1 else [None] * len(rows)
        return [scored_row(row, p, r, c, beta=self.beta, normalize=self.normalize)
                for row, p, r, c in zip(rows, per_model[0], reference, counts)]

    def __call__(self, rows: list[dict]) -> list[list[float]]:
        """One reward per response of each row: the reward-source interface."""
        return [[r["reward"] for r in row["responses"]] for row in self.score(rows)]


# ---------------------------------------------------------------------------------------------- reward sources
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
    is the user's own; a file is imported once per process, like a module). ValueError naming the spec when it
    cannot be found or its import fails."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ValueError(f"reward {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    try:
        if where.endswith(".py"):
            path = Path(where).resolve()
            if not path.is_file():
                raise ValueError(f"reward {spec!r}: {where}: no such file")
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
        raise ValueError(f"reward {spec!r}: cannot import {where!r} ({e}); is it on PYTHONPATH?") from None
    except ValueError:
        raise
    except Exception as e:  # the user's module failed while being imported
        raise ValueError(f"reward {spec!r}: importing {where} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {where} has no function {name!r}")
    return fn


def reward_source(kind: str, options: dict) -> RewardSource:
    """A reward source (rows -> one float per response) of a kind and its options:
    log-ratio: LogRatioReward's arguments (policy, reference, templates, beta, normalize, ...);
    pairrm: path (+ batch_size, dtype, device); python: function ('module:function')."""
    options = dict(options)
    if kind == "log-ratio":
        if not options.get("policy") or not options.get("policy_template"):
            raise ValueError("a log-ratio reward needs policy and policy_template (and reference with "
                             "reference_template, unless reference-free)")
        return LogRatioReward(options.pop("policy"), options.pop("reference", None), **options)
    if kind == "pairrm":
        from minalign.pairrm import PairRMReward  # here: pairrm.py imports this module
        if not options.get("path"):
            raise ValueError("a pairrm reward needs path (the PairRM checkpoint dir)")
        return PairRMReward(options.pop("path"), **options)
    if kind == "python":
        if set(options) != {"function"}:
            raise ValueError(f"a python reward takes one option, function ('module:function'); got {sorted(options)}")
        return load_function(options["function"])
    raise ValueError(f"unknown reward kind {kind!r}; known: {', '.join(REWARD_KINDS)}")


def parse_spec(spec: str) -> tuple[str, dict]:
    """(kind, options) of a --reward spec (SPEC_HELP lists the forms); ValueError naming the spec."""
    head, sep, rest = spec.partition(":")
    if head == "pairrm":
        if not rest:
            raise ValueError(f"reward {spec!r}: expected 'pairrm:DIR'")
        return "pairrm", {"path": rest}
    if head != "log-ratio":
        if not sep:
            raise ValueError(f"reward {spec!r}: expected one of {SPEC_HELP}")
        return "python", {"function": spec}
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in _LOG_RATIO_TYPES:
            raise ValueError(f"reward {spec!r}: {item!r} is not one of {', '.join(k + '=' for k in _LOG_RATIO_TYPES)}")
        try:
            options[key] = _LOG_RATIO_TYPES[key](value)
        except ValueError:
            raise ValueError(f"reward {spec!r}: bad value for {key}: {value!r}") from None
    if "policy" not in options:
        raise ValueError(f"reward {spec!r}: a log-ratio reward needs policy=DIR (and reference=DIR)")
    return "log-ratio", options


def from_spec(spec: str, **kwargs) -> RewardSource:
    """A reward source from a --reward spec; kwargs (dtype, device, batch_size for PairRM, batch_tokens for the
    log-ratio) go to the model-based kinds."""
    kind, options = parse_spec(spec)
    return reward_source(kind, options if kind == "python" else {**options, **kwargs})


def call_source(source: RewardSource, rows: list[dict], name: str) -> list[list[float]]:
    """source(rows), checked: one list per row, one finite number per response (bools count as 0/1).
    ValueError naming the source (name) and the first row and response at fault."""
    scores = source(rows)
    scores = scores.tolist() if hasattr(scores, "tolist") else scores  # a numpy array or a tensor
    if not isinstance(scores, (list, tuple)) or len(scores) != len(rows):
        got = f"{len(scores)} items" if isinstance(scores, (list, tuple)) else type(scores).__name__
        raise ValueError(f"reward {name}: expected one list of scores per row ({len(rows)} rows), got {got}")
    out = []
    for k, (row, values) in enumerate(zip(rows, scores)):
        n = len(row.get("responses", ()))
        values = values.tolist() if hasattr(values, "tolist") else values
        if not isinstance(values, (list, tuple)) or len(values) != n:
            raise ValueError(f"reward {name}: row {k} (id {row.get('id')!r}) has {n} responses but got {values!r}")
        for j, v in enumerate(values):
            ok = isinstance(v, numbers.Real) and math.isfinite(v)  # numpy's scalars are Reals; a bool is an int
            if not ok:
                raise ValueError(f"reward {name}: row {k} (id {row.get('id')!r}) responses[{j}]: {v!r} is not a "
                                 f"finite number")
        out.append([float(v) for v in values])
    return out


def score_rows(source: RewardSource, rows: list[dict], name: str) -> list[dict]:
    """rows with each response gaining its "reward" from source (checked: call_source)."""
    scores = call_source(source, rows, name)
    return [{**row, "responses": [{**r, "reward": v} for r, v in zip(row["responses"], values)]}
            for row, values in zip(rows, scores)]
