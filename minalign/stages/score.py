"""score.py: the DPO log-ratio reward of every sampled response, samples.jsonl -> scores.jsonl.

    python score.py --samples samples.jsonl --policy MIXTRAL_INSTRUCT_DIR --policy-template mistral \
        --reference MIXTRAL_DIR --reference-template raw --out scores.jsonl
    torchrun --nproc_per_node 8 score.py ...           # the responses shared out, one merged output file
    torchrun --nproc_per_node 8 score.py --fsdp ...    # and each model sharded over the ranks (FSDP2)

reward = β·(Σ_t log π_policy(y_t|x, y_<t) − Σ_t log π_ref(y_t|x, y_<t)) over the response tokens; --normalize mean
divides each sum by the response's token count; --reference-free keeps the policy term alone. Each model reads
the prompt in its own chat template (--policy-template, --reference-template: required, since a model read in a
template it was not trained on gives a wrong number, not an error); the response is the sampled
token_ids, the same for both models (which must share a tokenizer).

Input: sample.py's rows, {"id", "prompt" (a string or messages), "prompt_token_ids", "responses": [{"text",
"token_ids", "logprobs", "finish_reason"}]}. Output: the same rows in the same order, every field kept, each
response gaining "reward", "policy_logprob", "reference_logprob" (the two sums; no reference_logprob with
--reference-free) and "num_tokens".

One model at a time: the policy scores every response and is freed, then the reference is loaded. Resume: the
log-probs of each finished forward are appended to <out>.partial (<out>.partial.rank<r> under torchrun) and
fsynced, below a header line with the settings, so a kill after the policy pass does not redo it. `--resume`
checks the settings (all but --batch-tokens, --beta, --normalize and --fsdp: the rewards are computed from the
sums at the end). The output file appears when everything is done (an atomic rename), then the partial files go.

The responses are cut into forwards (longest first, at most --batch-tokens padded tokens each) before the ranks
share them out, so one process, N ranks, --fsdp and a killed and resumed run all write the same file, byte for
byte, for a given --batch-tokens. Under --fsdp a forward is a collective: a rank out of work runs dummy
forwards until every rank is done.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minalign import cli, distributed
from minalign.chat import TEMPLATES
from minalign.checkpoint import CheckpointError
from minalign.cli import CliError, append_lines, open_partials, partial_entries, write_output
from minalign.data import DataError, file_sha256, jsonl_line, read_jsonl
from minalign.progress import Progress
from minalign.rewards import (NORMALIZE, Scorer, Sequence, batch_logprobs, check_same_tokenizer, cut_batches,
                              release_memory, scored_row)

PARTIAL_FORMAT = "minalign score.py partial v1"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; a bad flag exits with status 2 and one line (cli.parser)."""
    p = cli.parser(__doc__)
    p.add_argument("--samples", required=True, help="sample.py's output JSONL")
    p.add_argument("--policy", required=True, help="HF checkpoint dir of the policy (Mixtral-8x7B-Instruct)")
    p.add_argument("--reference", help="HF checkpoint dir of the reference (Mixtral-8x7B); not with --reference-free")
    p.add_argument("--out", required=True, help="output JSONL; <out>.partial holds progress until it is complete")
    # No default templates: a model read in a template it was not trained on still gives a number, only a wrong one.
    p.add_argument("--policy-template", choices=sorted(TEMPLATES), required=True,
                   help="chat template the policy reads the prompt in (Mixtral-8x7B-Instruct: mistral)")
    p.add_argument("--reference-template", choices=sorted(TEMPLATES),
                   help="chat template the reference reads the prompt in (the base Mixtral-8x7B: raw); required "
                        "with --reference")
    p.add_argument("--normalize", choices=NORMALIZE, default="sum",
                   help="sum: log-prob sums; mean: each sum divided by the response's number of tokens")
    p.add_argument("--beta", type=float, default=1.0, help="scale of the reward")
    p.add_argument("--reference-free", action="store_true", help="reward = beta * policy log-prob alone")
    p.add_argument("--sampler-end-ids", type=int, nargs="+", action="extend", default=[], metavar="ID",
                   help="end-of-turn token ids of the sampling template (32000, <|endoftext|>, for Merlinite "
                        "samples): a response ending with one is scored as ending with each scoring template's "
                        "own end token (</s> for mistral and raw)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="most padded tokens in one forward")
    cli.add_common_flags(p, rows="sample")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard each model over the ranks (FSDP2), for a model too big for one device")
    args = p.parse_args(argv)
    if args.reference_free == (args.reference is not None):
        p.error("give --reference DIR, or --reference-free, not both" if args.reference_free
                else "the following arguments are required: --reference (or --reference-free)")
    if (args.reference is not None) != (args.reference_template is not None):
        p.error("--reference-template goes with --reference" if args.reference is None
                else "the following arguments are required: --reference-template (the template the reference "
                     "model was trained on)")
    cli.check_flags(p, args, {"--batch-tokens": args.batch_tokens >= 1, "--beta": math.isfinite(args.beta),
                              "--sampler-end-ids": all(i >= 0 for i in args.sampler_end_ids)})
    return args


def model_dirs(args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """{"policy": (dir, template), "reference": (dir, template)} (no reference with --reference-free)."""
    models = {"policy": (args.policy, args.policy_template)}
    if not args.reference_free:
        models["reference"] = (args.reference, args.reference_template)
    return models


def open_scorers(args: argparse.Namespace) -> dict[str, Scorer]:
    """The models' dirs, configs, tokenizers and templates checked (CliError naming the flag or dir), not loaded."""
    models = model_dirs(args)
    for name, (d, _) in models.items():
        cli.require_checkpoint_dir(d, f"--{name}")
    try:
        scorers = {name: Scorer.open(d, template) for name, (d, template) in models.items()}
        if "reference" in scorers:
            check_same_tokenizer(scorers["policy"].tokenizer, args.policy, scorers["reference"].tokenizer,
                                 args.reference)
    except (OSError, ValueError) as e:
        raise CliError(str(e)) from None
    return scorers


@dataclass
class Job:
    """One samples row to score: its line in the samples file, the row, and per model its sequences."""

    line: int
    row: dict
    sequences: list[list[Sequence]]  # [model][response] -> (prompt ids in that model's template, response ids)


def load_jobs(args: argparse.Namespace, scorers: list[Scorer]) -> tuple[list[Job], list[DataError]]:
    """Read and validate every samples row for every model; return (jobs in file order, the rows skipped)."""
    path = Path(args.samples)
    bad = cli.BadRows(args.skip_invalid)
    jobs: list[Job] = []
    for line, row in read_jsonl(path, on_error=bad):
        try:
            sequences = [scorer.sequences(row, args.sampler_end_ids) for scorer in scorers]
        except ValueError as e:
            bad(DataError(path, line, str(e)))
            continue
        jobs.append(Job(line, row, sequences))
    return jobs, bad.skipped


def finished_logprobs(entries, jobs: list[Job], passes: list[str]) -> dict[tuple[str, int, int], float]:
    """{(model, line, response): log-prob sum} of partial-file entries {"pass", "logprobs": [[line, j, sum]...]},
    after checking each names a response of this run. A forward redone after a kill may appear twice."""
    sizes = {job.line: len(job.sequences[0]) for job in jobs}
    done: dict[tuple[str, int, int], float] = {}
    for path, number, entry in entries:
        items = entry.get("logprobs")
        if not (entry.get("pass") in passes and isinstance(items, list) and all(
                isinstance(it, list) and len(it) == 3 and type(it[0]) is int and type(it[1]) is int
                and 0 <= it[1] < sizes.get(it[0], 0) and type(it[2]) is float for it in items)):
            raise CliError(f"{path}:{number}: not a finished forward of this run (a corrupt partial file?); "
                           f"delete it to start over")
        for line, j, value in items:
            done[entry["pass"], line, j] = value
    return done


def load_model(scorer: Scorer, dtype: str, device: torch.device, fsdp: bool):
    """The scorer's model on this rank: whole on the device, or (FSDP) this rank's shards of it."""
    try:
        if fsdp:  # memory-mapped on the CPU; fully_shard moves only this rank's shards to the device
            return distributed.shard_model(scorer.load(getattr(torch, dtype), "cpu"), device)
        return scorer.load(getattr(torch, dtype), device)
    except CheckpointError as e:  # names the file or keys at fault
        raise CliError(str(e)) from None


def score_pass(p: int, name: str, scorer: Scorer, jobs: list[Job], done: dict, f, args: argparse.Namespace,
               rank: int, world: int, device: torch.device, dtype: str) -> tuple[int, float]:
    """Score this rank's share of every response with one model; return the tokens it fed to the model and the
    seconds that took (after loading it)."""
    keys = [(job.line, j) for job in jobs for j in range(len(job.sequences[p]))]
    seqs = [s for job in jobs for s in job.sequences[p]]
    # Forwards are cut from all responses, then dealt to the ranks whole (see the module doc). Every rank knows
    # every rank's share and what the partial files hold, so under FSDP all agree, without a word, on how many
    # forwards to run in lockstep. A forward is redone whole if any of its responses is missing.
    batches = cut_batches(seqs, args.batch_tokens)
    todo = [[b for b in batches[r::world] if any((name, *keys[i]) not in done for i in b)] for r in range(world)]
    mine = todo[rank]
    steps = max(map(len, todo)) if args.fsdp else len(mine)
    if not steps:
        return 0, 0.0
    distributed.doing(f"loading the {name}")
    model = load_model(scorer, dtype, device, args.fsdp)
    start = time.perf_counter()
    bar = Progress(sum(map(len, mine)), unit=f"responses ({name})", enabled=distributed.is_main())
    fed = 0
    for step in range(steps):
        distributed.doing(f"scoring with the {name}, forward {step + 1}/{steps}")
        if step >= len(mine):  # FSDP: out of work, but every forward needs every rank's shards
            batch_logprobs(model, [([0], [0])])
            continue
        batch = mine[step]
        values = batch_logprobs(model, [seqs[i] for i in batch])
        if not all(map(math.isfinite, values)):  # JSON has no NaN; and a NaN reward would rank nothing
            k = next(k for k, v in enumerate(values) if not math.isfinite(v))
            line, j = keys[batch[k]]
            raise CliError(f"{args.samples}:{line}: the {name} gives responses[{j}] a log-prob of {values[k]} "
                           f"(an overflow in {dtype}? try --dtype bfloat16 or float32)")
        append_lines(f, [jsonl_line({"pass": name, "logprobs": [[*keys[i], v] for i, v in zip(batch, values)]})])
        tokens = sum(len(seqs[i][0]) + len(seqs[i][1]) for i in batch)
        fed += tokens
        bar.advance(items=len(batch), tokens=tokens)
    bar.close()
    seconds = time.perf_counter() - start
    del model
    release_memory()
    return fed, seconds


def run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> int:
    """Everything after argument parsing, owning --out (cli.run_lock); raises CliError for problems the user can
    fix."""
    with cli.run_lock(Path(args.out), "--out"):
        return _run(args, rank, world, device)


def _run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> int:
    samples, out = Path(args.samples), Path(args.out)
    main_rank = distributed.is_main()  # messages every rank would print alike come from rank 0 only
    models, scorers = model_dirs(args), open_scorers(args)
    if not samples.is_file():
        raise CliError(f"--samples {samples}: no such file")
    if cli.output_done(args, "score.py", samples=samples):
        return 0
    if args.fsdp and world == 1:
        raise CliError("--fsdp shards each model over torchrun's processes: run it under torchrun, 2 or more")
    passes = list(scorers)

    # Every rank reads and validates every row, so all agree on the rows, the forwards and which rows were skipped.
    jobs, skipped = load_jobs(args, list(scorers.values()))
    for err in skipped if main_rank else ():
        print(f"score.py: skipped {err}", file=sys.stderr)

    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    # What a resume must match: everything that changes a log-prob sum.
    settings = dict(samples_sha256=file_sha256(samples),
                    **{name: str(Path(d).resolve()) for name, (d, _) in models.items()},
                    **{f"{name}_template": template for name, (_, template) in models.items()},
                    sampler_end_ids=args.sampler_end_ids, dtype=dtype, device=device.type,
                    skip_invalid=args.skip_invalid, world_size=world)
    partial, ours, entries = open_partials(out, rank, world, resume=args.resume, fmt=PARTIAL_FORMAT,
                                           settings=settings)
    done = finished_logprobs(entries, jobs, passes)
    if main_rank:  # what each model reads, said once the run starts (an error before it stays one line)
        print("score.py: " + "; ".join(f"{name} {d} reads prompts in the {template!r} template"
                                       for name, (d, template) in models.items()), file=sys.stderr)
    if done and main_rank:
        total = len(passes) * sum(len(job.sequences[0]) for job in jobs)
        print(f"score.py: resuming: {len(done)} of {total} response log-probs are done", file=sys.stderr)

    fed, elapsed = 0, 0.0
    with open(partial, "ab") as f:
        for p, (name, scorer) in enumerate(scorers.items()):
            tokens, seconds = score_pass(p, name, scorer, jobs, done, f, args, rank, world, device, dtype)
            fed, elapsed = fed + tokens, elapsed + seconds

    # all_sum is also a barrier: once it returns, every rank's partial file is complete.
    (fed,) = distributed.all_sum([fed])
    if main_rank:
        distributed.doing(f"merging the partial files into {out}")
        merged = merge(out, ours, settings, jobs, passes, args)
        responses = [r for row in merged for r in row["responses"]]
        mean = sum(r["reward"] for r in responses) / len(responses) if responses else float("nan")
        extra = (f", {len(done)} log-probs resumed" if done else "") + (f", skipped {len(skipped)}" if skipped else "")
        # The counts describe the output file; the rate is of the tokens (prompt + response) this run fed the models
        # (all ranks), over the time rank 0 spent scoring (model loading left out).
        print(f"score.py: rows {len(merged)}, responses {len(responses)}, tokens "
              f"{sum(r['num_tokens'] for r in responses)}, mean reward {mean:.4f}, "
              f"{fed / max(elapsed, 1e-9):.1f} tokens/s{extra} -> {out}", file=sys.stderr)
    distributed.barrier()  # leave together (see sample.py)
    return 0


def merge(out: Path, partials: list[Path], settings: dict, jobs: list[Job], passes: list[str],
          args: argparse.Namespace) -> list[dict]:
    """Write every row with its rewards to out in input order (atomically), then remove the partial files."""
    done = finished_logprobs(partial_entries(partials, PARTIAL_FORMAT, settings), jobs, passes)
    missing = [(name, job.line) for name in passes for job in jobs
               for j in range(len(job.sequences[0])) if (name, job.line, j) not in done]
    assert not missing, f"the log-probs of (model, line) {missing[:10]} are in no partial file"
    rows = []
    for job in jobs:
        sums = [[done[name, job.line, j] for j in range(len(job.sequences[0]))] for name in passes]
        counts = [len(response) for _, response in job.sequences[0]]
        rows.append(scored_row(job.row, sums[0], sums[1] if len(sums) > 1 else None, counts,
                               beta=args.beta, normalize=args.normalize))
    return write_output(out, rows, partials)


def main(argv: list[str] | None = None) -> int:
    """Run score.py; returns the exit status (0 done, 2 bad input or settings, 130 interrupted)."""
    return cli.main("score.py", argv, parse_args, run, kept="finished log-probs")


if __name__ == "__main__":
    distributed.exit(main())
