"""The score stage: a reward for every sampled response, samples.jsonl -> scores.jsonl.

    python score.py --samples samples.jsonl --policy MIXTRAL_INSTRUCT_DIR --policy-template mistral \
        --reference MIXTRAL_DIR --reference-template raw --out scores.jsonl
    torchrun --nproc_per_node 8 score.py ...           # the responses shared out, one merged output file
    torchrun --nproc_per_node 8 score.py --fsdp ...    # and each model sharded over the ranks (FSDP2)
    python score.py --samples samples.jsonl --reward pairrm:PAIRRM_DIR --out scores.jsonl   # any reward source

The DPO log-ratio reward (logratio.py): reward = β·(Σ_t log π_policy(y_t|x, y_<t) − Σ_t log π_ref(y_t|x, y_<t))
over the response tokens; --normalize mean divides each sum by the response's token count; --reference-free keeps
the policy term alone. Each model reads the prompt in its own chat template (--policy-template,
--reference-template: required, since a model read in a template it was not trained on gives a wrong number, not
an error); the response is the sampled token_ids, the same for both models (which must share a tokenizer).
`--reward SPEC` scores with another reward source instead (rewards.SPEC_HELP: PairRM, a Python function), on rank
0, every row at once.

Input: sample.py's rows, {"id", "prompt" (a string or messages), "prompt_token_ids", "responses": [{"text",
"token_ids", "logprobs", "finish_reason"}]}. Output: the same rows in the same order, every field kept, each
response gaining "reward" and, for the log-ratio, "policy_logprob", "reference_logprob" (the two sums; no
reference_logprob with --reference-free) and "num_tokens"; with --token-logprobs also "policy_token_logprobs" and
"reference_token_logprobs", the terms of those sums from the same forwards (the reward's per-token terms are
β·(policy_t − reference_t), divided by num_tokens with --normalize mean).

One model at a time: the policy scores every response and is freed, then the reference is loaded. Resume
(runs.Partials): the log-probs of each finished forward are appended to <out>.partial (<out>.partial.rank<r>
under torchrun) and fsynced, below a header line with the settings, so a kill after the policy pass does not
redo it. `--resume` checks the settings (all but --batch-tokens, --beta, --normalize and --fsdp: the rewards are
computed from the sums at the end). The output file appears when everything is done (an atomic rename), then the
partial files go. One process, N ranks, --fsdp and a killed and resumed run all write the same file, byte for
byte, for a given --batch-tokens (logratio.score_pass says why).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minalign import distributed
from minalign.chat import TEMPLATES
from minalign.checkpoint import require_dir
from minalign.data import file_sha256, jsonl_line, read_jsonl, write_jsonl
from minalign.errors import ConfigError, DataError, MinalignError, RewardError
from minalign.logratio import NORMALIZE, ScoreJob, Scorer, check_same_tokenizer, make_jobs, score_pass, scored_rows
from minalign.rewards import SPEC_HELP, from_spec, parse_spec, score_rows
from minalign.rows import BadRows
from minalign.runs import Partials, StageOptions, check_ranges, on_main, output_done, owning_out
from minalign.settings import flag

PARTIAL_FORMAT = "minalign score.py partial v1"


@dataclass(kw_only=True)
class ScoreConfig(StageOptions):
    """Everything the score stage reads: score.py's flags, or what the loop sets for a round (RewardSection)."""

    samples: str = flag()  # sample.py's output JSONL
    policy: str | None = None  # HF checkpoint dir of the policy (Mixtral-8x7B-Instruct)
    reference: str | None = None  # HF checkpoint dir of the reference (Mixtral-8x7B); not with --reference-free
    out: str = flag()  # output JSONL; <out>.partial holds progress until it is complete
    # No default templates: a model read in a template it was not trained on still gives a number, only a wrong one.
    policy_template: str | None = flag(None, choices=sorted(TEMPLATES))  # chat template the policy reads the prompt in (Mixtral-8x7B-Instruct: mistral); required with --policy
    reference_template: str | None = flag(None, choices=sorted(TEMPLATES))  # chat template the reference reads the prompt in (the base Mixtral-8x7B: raw); required with --reference
    normalize: str = flag("sum", choices=NORMALIZE)  # sum: log-prob sums; mean: each sum divided by the response's number of tokens
    beta: float = 1.0  # scale of the reward
    reference_free: bool = False  # reward = beta * policy log-prob alone
    sampler_end_ids: list = flag([], metavar="ID", type=int)  # end-of-turn token ids of the sampling template (32000, <|endoftext|>, for Merlinite samples): a response ending with one is scored as ending with each scoring template's own end token (</s> for mistral and raw)
    batch_tokens: int = 16384  # most padded tokens in one forward
    token_logprobs: bool = False  # keep each response's per-token log-probs beside the sums (policy_token_logprobs, reference_token_logprobs): the reward's per-token terms, for the audit report (~25 bytes a token and model; the demo's file grows 1.6x)
    reward: str | None = flag(None, metavar="SPEC", help="another reward source instead of --policy: " + SPEC_HELP)  # see SPEC_HELP
    fsdp: bool = False  # under torchrun: shard each model over the ranks (FSDP2), for a model too big for one device


@dataclass
class RewardSection:
    """The [reward] table of a loop config: which reward the score stage computes each round."""

    kind: str = "log-ratio"  # log-ratio | pairrm | python
    policy: str = ""  # log-ratio: the "instruct" model (Mixtral-8x7B-Instruct-v0.1)
    reference: str = ""  # log-ratio: the base model (Mixtral-8x7B-v0.1); "" = reference-free
    policy_template: str = ""  # log-ratio: the template reward.policy was trained on (no default: see score.py)
    reference_template: str = ""  # log-ratio: the template reward.reference was trained on
    normalize: str = "sum"  # sum | mean (per response token)
    beta: float = 1.0  # log-ratio: reward = beta · (log π_policy − log π_ref)
    sampler_end_ids: list = field(default_factory=list)  # see score.py --sampler-end-ids
    batch_tokens: int = 16384  # padded tokens per scoring forward
    token_logprobs: bool = False  # log-ratio: keep the per-token log-probs (score.py --token-logprobs), so the round's report colours each token by its reward term
    fsdp: bool = False  # under torchrun: shard each reward model over the ranks
    path: str = ""  # pairrm: the PairRM checkpoint dir
    function: str = ""  # python: 'module:function' or 'path/to/file.py:function'

    def stage_config(self, samples: Path, out: Path, device: str) -> ScoreConfig:
        """The score stage's config for one samples file, resuming whatever a killed loop left."""
        if self.kind != "log-ratio":
            return ScoreConfig(samples=str(samples), out=str(out), reward=self.spec(), device=device, resume=True)
        return ScoreConfig(samples=str(samples), out=str(out), policy=self.policy, policy_template=self.policy_template,
                           reference=self.reference or None,
                           reference_template=(self.reference_template or None) if self.reference else None,
                           reference_free=not self.reference, normalize=self.normalize, beta=self.beta,
                           sampler_end_ids=list(self.sampler_end_ids), batch_tokens=self.batch_tokens,
                           token_logprobs=self.token_logprobs, fsdp=self.fsdp, device=device, resume=True)

    def spec(self) -> str:
        """This reward as a --reward spec (rewards.SPEC_HELP), for the kinds other than log-ratio."""
        return f"pairrm:{self.path}" if self.kind == "pairrm" else self.function


def check_config(cfg: ScoreConfig) -> None:
    """ConfigError naming the flag of a setting out of range, or a flag without the one it needs."""
    if cfg.reward is not None:
        if cfg.policy is not None or cfg.reference is not None or cfg.reference_free or cfg.fsdp or \
                cfg.token_logprobs:
            raise ConfigError("--reward SPEC scores with that source: leave out --policy, --reference, "
                              "--reference-free, --fsdp and --token-logprobs")
        try:
            parse_spec(cfg.reward)
        except ValueError as e:
            raise ConfigError(f"--reward: {e}") from None
        return
    if cfg.policy is None:
        raise ConfigError("the following arguments are required: --policy (or --reward SPEC)")
    if cfg.policy_template is None:
        raise ConfigError("the following arguments are required: --policy-template")
    if cfg.reference_free == (cfg.reference is not None):
        raise ConfigError("give --reference DIR, or --reference-free, not both" if cfg.reference_free
                          else "the following arguments are required: --reference (or --reference-free)")
    if (cfg.reference is not None) != (cfg.reference_template is not None):
        raise ConfigError("--reference-template goes with --reference" if cfg.reference is None
                          else "the following arguments are required: --reference-template (the template the "
                               "reference model was trained on)")
    check_ranges({"--batch-tokens": cfg.batch_tokens >= 1, "--beta": math.isfinite(cfg.beta),
                  "--sampler-end-ids": all(i >= 0 for i in cfg.sampler_end_ids)}, cfg)


def model_dirs(cfg: ScoreConfig) -> dict[str, tuple[str, str]]:
    """{"policy": (dir, template), "reference": (dir, template)} (no reference with --reference-free)."""
    models = {"policy": (cfg.policy, cfg.policy_template)}
    if not cfg.reference_free:
        models["reference"] = (cfg.reference, cfg.reference_template)
    return models


def open_scorers(cfg: ScoreConfig) -> dict[str, Scorer]:
    """The models' dirs, configs, tokenizers and templates checked (errors naming the flag or dir), not loaded."""
    models = model_dirs(cfg)
    for name, (d, _) in models.items():
        require_dir(d, f"--{name}")
    scorers = {name: Scorer.open(d, template) for name, (d, template) in models.items()}
    if "reference" in scorers:
        check_same_tokenizer(scorers["policy"].tokenizer, cfg.policy, scorers["reference"].tokenizer, cfg.reference)
    return scorers


def finished_logprobs(entries, jobs: list[ScoreJob], passes: list[str],
                      terms: dict | None = None) -> dict[tuple[str, int, int], float]:
    """{(model, line, response): log-prob sum} of partial-file entries {"pass", "logprobs": [[line, j, sum]...]},
    after checking each names a response of this run; with terms (--token-logprobs) the items are
    [line, j, sum, [term...]] and terms gets {(model, line, response): [term...]}. A forward redone after a kill
    may appear twice."""
    sizes = {job.line: len(job.sequences[0]) for job in jobs}
    tokens = {(job.line, j): len(response) for job in jobs for j, (_, response) in enumerate(job.sequences[0])}
    width = 3 if terms is None else 4
    done: dict[tuple[str, int, int], float] = {}
    for path, number, entry in entries:
        items = entry.get("logprobs")
        if not (entry.get("pass") in passes and isinstance(items, list) and all(
                isinstance(it, list) and len(it) == width and type(it[0]) is int and type(it[1]) is int
                and 0 <= it[1] < sizes.get(it[0], 0) and type(it[2]) is float
                and (width == 3 or isinstance(it[3], list) and len(it[3]) == tokens[it[0], it[1]]
                     and all(type(v) is float for v in it[3])) for it in items)):
            raise DataError(path, number, "not a finished forward of this run (a corrupt partial file?); delete it "
                                          "to start over")
        for line, j, value, *rest in items:
            done[entry["pass"], line, j] = value
            if terms is not None:
                terms[entry["pass"], line, j] = rest[0]
    return done


def score_with(spec: str, samples: Path, device: torch.device) -> list[dict]:
    """The rows of a samples file with each response's reward from the source a --reward spec names."""
    rows = [row for _, row in read_jsonl(samples)]
    try:
        return score_rows(from_spec(spec, device=device), rows, spec)
    except MinalignError:
        raise
    except ValueError as e:  # raised by the source itself (a user's function, PairRM on a malformed row)
        raise RewardError(f"--reward {spec}: {e}") from None


def score(cfg: ScoreConfig, rank: int = 0, world: int = 1, device: torch.device | None = None) -> Path:
    """Run (or resume) the score stage cfg describes, owning cfg.out meanwhile (runs.run_lock); returns cfg.out."""
    check_config(cfg)
    return owning_out(_score, cfg, rank, world, device)


def _score(cfg: ScoreConfig, rank: int, world: int, device: torch.device) -> None:
    samples, out = Path(cfg.samples), Path(cfg.out)
    main_rank = distributed.is_main()  # messages every rank would print alike come from rank 0 only
    scorers = open_scorers(cfg) if cfg.reward is None else {}
    if not samples.is_file():
        raise ConfigError(f"--samples {samples}: no such file")
    if output_done(out, "score.py", resume=cfg.resume, overwrite=cfg.overwrite, samples=samples):
        return
    if cfg.reward is not None:  # a ranker or a user's function: on rank 0, on every row at once
        def scored() -> None:
            rows = score_with(cfg.reward, samples, device)
            write_jsonl(out, rows)
            rewards = [r["reward"] for row in rows for r in row["responses"]]
            print(f"score.py: rows {len(rows)}, responses {len(rewards)}, mean reward "
                  f"{sum(rewards) / max(1, len(rewards)):.4f} ({cfg.reward}) -> {out}", file=sys.stderr)
        on_main(scored)
        return
    if cfg.fsdp and world == 1:
        raise ConfigError("--fsdp shards each model over torchrun's processes: run it under torchrun, 2 or more")
    passes, models = list(scorers), model_dirs(cfg)

    # Every rank reads and validates every row, so all agree on the rows, the forwards and which rows were skipped.
    bad = BadRows(cfg.skip_invalid)
    jobs = make_jobs(read_jsonl(samples, on_error=bad), list(scorers.values()), cfg.sampler_end_ids,
                     lambda line, e: bad(DataError(samples, line, str(e))))
    for err in bad.skipped if main_rank else ():
        print(f"score.py: skipped {err}", file=sys.stderr)

    dtype = cfg.weights_dtype(device)
    # What a resume must match: everything that changes a log-prob sum.
    settings = dict(samples_sha256=file_sha256(samples),
                    **{name: str(Path(d).resolve()) for name, (d, _) in models.items()},
                    **{f"{name}_template": template for name, (_, template) in models.items()},
                    sampler_end_ids=cfg.sampler_end_ids, dtype=dtype, device=device.type,
                    skip_invalid=cfg.skip_invalid, world_size=world,
                    # only when on: a partial file written before this setting existed still resumes
                    **({"token_logprobs": True} if cfg.token_logprobs else {}))
    partials = Partials(out, rank, world, resume=cfg.resume, fmt=PARTIAL_FORMAT, settings=settings)
    terms = {} if cfg.token_logprobs else None
    done = finished_logprobs(partials.entries, jobs, passes, terms)
    if main_rank:  # what each model reads, said once the run starts (an error before it stays one line)
        print("score.py: " + "; ".join(f"{name} {d} reads prompts in the {template!r} template"
                                       for name, (d, template) in models.items()), file=sys.stderr)
    if done and main_rank:
        total = len(passes) * sum(len(job.sequences[0]) for job in jobs)
        print(f"score.py: resuming: {len(done)} of {total} response log-probs are done", file=sys.stderr)

    fed, elapsed, resumed = 0, 0.0, len(done)
    with partials.appender() as append:
        for p, (name, scorer) in enumerate(scorers.items()):
            tokens, seconds = score_pass(
                p, name, scorer, jobs, done, lambda items: append([jsonl_line({"pass": name, "logprobs": items})]),
                batch_tokens=cfg.batch_tokens, dtype=getattr(torch, dtype), device=device, rank=rank, world=world,
                fsdp=cfg.fsdp, where=str(samples), progress=True, terms=terms)
            fed, elapsed = fed + tokens, elapsed + seconds

    # all_sum is also a barrier: once it returns, every rank's partial file is complete.
    (fed,) = distributed.all_sum([fed])
    if main_rank:
        distributed.doing(f"merging the partial files into {out}")
        terms = {} if cfg.token_logprobs else None
        done = finished_logprobs(partials.read(), jobs, passes, terms)
        missing = [(name, job.line) for name in passes for job in jobs
                   for j in range(len(job.sequences[0])) if (name, job.line, j) not in done]
        assert not missing, f"the log-probs of (model, line) {missing[:10]} are in no partial file"
        merged = partials.commit(scored_rows(jobs, done, passes, beta=cfg.beta, normalize=cfg.normalize,
                                             terms=terms))
        responses = [r for row in merged for r in row["responses"]]
        mean = sum(r["reward"] for r in responses) / len(responses) if responses else float("nan")
        extra = ((f", {resumed} log-probs resumed" if resumed else "") +
                 (f", skipped {len(bad.skipped)}" if bad.skipped else ""))
        print(f"score.py: rows {len(merged)}, responses {len(responses)}, tokens "
              f"{sum(r['num_tokens'] for r in responses)}, mean reward {mean:.4f}, "
              f"{fed / max(elapsed, 1e-9):.1f} tokens/s{extra} -> {out}", file=sys.stderr)
    distributed.barrier()  # leave together (see sample.py)
