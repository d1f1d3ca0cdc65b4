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

The same pieces serve the score stage (score.py: resumable, under torchrun, FSDP for a big reward model) and
`LogRatioReward`, the in-memory reward source (best-of-N, Python callers): one implementation. Memory: the two
models are never loaded at once (Mixtral-8x7B is ~94 GB in bf16): the policy scores every response and is freed,
then the reference does.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import minalign
from minalign import distributed
from minalign.chat import end_token_id, render_prompt
from minalign.checkpoint import check_checkpoint
from minalign.config import ModelConfig
from minalign.errors import CheckpointError, DataError
from minalign.logprobs import pack_by_length, sequence_logprobs
from minalign.parallel import shard_model
from minalign.progress import Progress
from minalign.rows import response_token_ids, sample_prompt
from minalign.tokenizer import Tokenizer

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
    """CheckpointError naming both directories unless the tokenizers give every id the same meaning (sentencepiece
    model bytes and added tokens): the response ids are scored by both models as they are."""
    if policy.sp.serialized_model_proto() != reference.sp.serialized_model_proto():
        what = "their tokenizer.model files differ"
    elif policy.added_tokens != reference.added_tokens:
        diff = sorted(set(policy.added_tokens.items()) ^ set(reference.added_tokens.items()), key=lambda kv: kv[1])
        what = f"their added tokens differ ({', '.join(f'{c!r}={i}' for c, i in diff[:6])})"
    else:
        return
    raise CheckpointError(f"the policy {policy_dir} and the reference {reference_dir} must share a tokenizer (both score "
                     f"the same response token ids), but {what}")


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
            raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                             f"{config.vocab_size}: they do not belong together")
        try:
            end_id = end_token_id(tokenizer, template)  # renders a reply: fails if the template's tokens are missing
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        return cls(path, template, tokenizer, config, end_id)

    def sequences(self, row: dict, sampler_end_ids=()) -> list[Sequence]:
        """(prompt ids, response ids) of each response of a samples row as this model scores them; ValueError
        for a malformed row, an id outside the tokenizer or a sequence longer than the model's context."""
        prompt = render_prompt(self.tokenizer, self.template, sample_prompt(row))
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


def batch_logprobs(model, sequences: list[Sequence], terms: list | None = None) -> list[float]:
    """Σ log π(response | prompt) of each sequence, computed in one forward (as float, in order); terms, if given,
    gets each sum's per-token terms appended (lists of float, from the same forward)."""
    prompts, responses = zip(*sequences)
    padded = len(sequences) * max(len(p) + len(r) for p, r in sequences)
    # A budget of exactly the padded size: sequence_logprobs packs the batch into one forward, which FSDP's
    # lockstep counts on (every rank must run as many forwards as every other).
    with torch.no_grad():
        out = sequence_logprobs(model, list(prompts), list(responses), batch_tokens=padded,
                                per_token=terms is not None)
    if terms is not None:  # one copy to the host for the whole forward, then cut per sequence
        flat = torch.cat(out.terms).float().cpu().tolist()
        at = 0
        for t in out.terms:
            terms.append(flat[at:at + len(t)])
            at += len(t)
    return out.sums.cpu().tolist()


def scored_row(row: dict, policy: list[float], reference: list[float] | None, counts: list[int], *,
               beta: float = 1.0, normalize: str = "sum", policy_terms: list[list[float]] | None = None,
               reference_terms: list[list[float]] | None = None) -> dict:
    """row with each response gaining "reward", "policy_logprob", "reference_logprob" (not when reference-free)
    and "num_tokens", and with the per-token terms of those sums, "policy_token_logprobs" and
    "reference_token_logprobs"; all other fields as they were, in their order."""
    responses = []
    for j, r in enumerate(row["responses"]):
        ref = None if reference is None else reference[j]
        r = {**r, "reward": log_ratio(policy[j], ref, counts[j], beta=beta, normalize=normalize),
             "policy_logprob": policy[j]}
        if ref is not None:
            r["reference_logprob"] = ref
        r["num_tokens"] = counts[j]
        if policy_terms is not None:
            r["policy_token_logprobs"] = policy_terms[j]
        if reference_terms is not None:
            r["reference_token_logprobs"] = reference_terms[j]
        responses.append(r)
    return {**row, "responses": responses}


@dataclass
class ScoreJob:
    """One samples row to score: its line (or index), the row, and per model its sequences."""

    line: int
    row: dict
    sequences: list[list[Sequence]]  # [model][response] -> (prompt ids in that model's template, response ids)


def make_jobs(numbered_rows, scorers: list[Scorer], sampler_end_ids, on_bad: Callable[[int, ValueError], None]) -> list[ScoreJob]:
    """A ScoreJob of each (line, row) whose responses every scorer can score; on_bad(line, error) for the others (it
    raises, or collects and the row is skipped)."""
    jobs = []
    for line, row in numbered_rows:
        try:
            jobs.append(ScoreJob(line, row, [scorer.sequences(row, sampler_end_ids) for scorer in scorers]))
        except ValueError as e:
            on_bad(line, e)
    return jobs


def load_scorer_model(scorer: Scorer, dtype: torch.dtype | None, device: torch.device, fsdp: bool):
    """The scorer's model on this rank: whole on the device, or (FSDP) this rank's shards of it."""
    if fsdp:  # memory-mapped on the CPU; fully_shard moves only this rank's shards to the device
        return shard_model(scorer.load(dtype, "cpu"), device)
    return scorer.load(dtype, device)


def score_pass(p: int, name: str, scorer: Scorer, jobs: list[ScoreJob], done: dict, append, *, batch_tokens: int,
               dtype: torch.dtype | None, device: torch.device, rank: int = 0, world: int = 1, fsdp: bool = False,
               where: str = "rows", progress: bool = False, terms: dict | None = None) -> tuple[int, float]:
    """Score this rank's share of every response with model p (`name`): done[name, line, j] = Σ log π of each, and
    append([[line, j, sum]...]) after each forward (a resumable stage keeps them); return the tokens fed to the
    model and the seconds that took (after loading it). Responses already in done are not scored again. terms, if
    given, also gets each sum's per-token terms, terms[name, line, j], and append gets [line, j, sum, terms].

    The forwards are cut from all responses (longest first, at most batch_tokens padded tokens) before they are
    dealt to the ranks whole, so one process, N ranks, FSDP and a resumed run compute the very same forwards.
    Every rank knows every rank's share and what done holds, so under FSDP all agree, without a word, on how many
    forwards to run in lockstep: a rank out of work runs dummy forwards. A forward is redone whole if any of its
    responses is missing. where: what the line numbers index (a samples file), for the message about a
    non-finite log-prob; progress: show a progress bar (rank 0).
    """
    keys = [(job.line, j) for job in jobs for j in range(len(job.sequences[p]))]
    seqs = [s for job in jobs for s in job.sequences[p]]
    batches = cut_batches(seqs, batch_tokens)
    todo = [[b for b in batches[r::world] if any((name, *keys[i]) not in done for i in b)] for r in range(world)]
    mine = todo[rank]
    steps = max(map(len, todo)) if fsdp else len(mine)
    if not steps:
        return 0, 0.0
    distributed.doing(f"loading the {name}")
    model = load_scorer_model(scorer, dtype, device, fsdp)
    start = time.perf_counter()
    bar = Progress(sum(map(len, mine)), unit=f"responses ({name})", enabled=progress and distributed.is_main())
    fed = 0
    for step in range(steps):
        distributed.doing(f"scoring with the {name}, forward {step + 1}/{steps}")
        if step >= len(mine):  # FSDP: out of work, but every forward needs every rank's shards
            batch_logprobs(model, [([0], [0])])
            continue
        batch = mine[step]
        per_token = [] if terms is not None else None
        values = batch_logprobs(model, [seqs[i] for i in batch], per_token)
        if not all(map(math.isfinite, values)):  # JSON has no NaN; and a NaN reward would rank nothing
            k = next(k for k, v in enumerate(values) if not math.isfinite(v))
            line, j = keys[batch[k]]
            raise DataError(where, line, f"the {name} gives responses[{j}] a log-prob of {values[k]} (an overflow "
                                         f"in {dtype}? try --dtype bfloat16 or float32)")
        for i, v in zip(batch, values):
            done[(name, *keys[i])] = v
        if terms is None:
            append([[*keys[i], v] for i, v in zip(batch, values)])
        else:
            for i, t in zip(batch, per_token):
                terms[(name, *keys[i])] = t
            append([[*keys[i], v, t] for i, v, t in zip(batch, values, per_token)])
        tokens = sum(len(seqs[i][0]) + len(seqs[i][1]) for i in batch)
        fed += tokens
        bar.advance(items=len(batch), tokens=tokens)
    bar.close()
    seconds = time.perf_counter() - start
    del model
    distributed.release_memory()
    return fed, seconds


def scored_rows(jobs: list[ScoreJob], done: dict, passes: list[str], *, beta: float, normalize: str,
                terms: dict | None = None) -> list[dict]:
    """Every job's row with its rewards (scored_row), from the log-prob sums in done (and their per-token terms in
    terms, when given)."""
    rows = []
    for job in jobs:
        n = len(job.sequences[0])
        sums = [[done[name, job.line, j] for j in range(n)] for name in passes]
        parts = [[terms[name, job.line, j] for j in range(n)] for name in passes] if terms is not None else None
        counts = [len(response) for _, response in job.sequences[0]]
        rows.append(scored_row(job.row, sums[0], sums[1] if len(sums) > 1 else None, counts, beta=beta,
                               normalize=normalize, policy_terms=parts[0] if parts else None,
                               reference_terms=parts[1] if parts and len(parts) > 1 else None))
    return rows


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
        self.scorers = {"policy": Scorer.open(policy, policy_template)}
        if reference is not None:
            self.scorers["reference"] = Scorer.open(reference, reference_template)
            check_same_tokenizer(self.scorers["policy"].tokenizer, policy, self.scorers["reference"].tokenizer,
                                 reference)
        self.beta, self.normalize, self.sampler_end_ids = beta, normalize, tuple(sampler_end_ids)
        self.batch_tokens, self.dtype, self.device = batch_tokens, dtype, torch.device(device)

    def score(self, rows: list[dict]) -> list[dict]:
        """The rows with each response's reward and the log-prob sums it came from (see scored_row): the score
        stage's passes, in memory."""
        def bad(k: int, e: ValueError):
            raise ValueError(f"row {k}: {e}") from None
        jobs = make_jobs(enumerate(rows), list(self.scorers.values()), self.sampler_end_ids, bad)
        done: dict = {}
        for p, (name, scorer) in enumerate(self.scorers.items()):
            score_pass(p, name, scorer, jobs, done, lambda items: None, batch_tokens=self.batch_tokens,
                       dtype=self.dtype, device=self.device)
        return scored_rows(jobs, done, list(self.scorers), beta=self.beta, normalize=self.normalize)

    def __call__(self, rows: list[dict]) -> list[list[float]]:
        """One reward per response of each row: the reward-source interface (rewards.py)."""
        return [[r["reward"] for r in row["responses"]] for row in self.score(rows)]
