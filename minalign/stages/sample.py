"""sample.py: N responses per prompt from a checkpoint with the KV-cache sampler, prompts.jsonl -> samples.jsonl.

    python sample.py --model DIR --prompts prompts.jsonl --out samples.jsonl --template merlinite -n 4
    torchrun --nproc_per_node 8 sample.py ...      # prompts split across ranks, one merged output file

Input rows: {"id"?, "prompt": str} or {"id"?, "messages": [{"role", "content"}, ...]}, optional "source".
A row without an id gets its line number in the prompts file (an int, the number error messages print).
Output, one row per prompt in input order:
    {"id", "prompt", "source"?, "prompt_token_ids", "responses": [{"text", "token_ids", "logprobs", "finish_reason"}]}

Resume: each finished prompt is appended to <out>.partial (<out>.partial.rank<r> under torchrun) and fsynced
after every batch; the file's first line records the settings. `--resume` continues from it, after checking
the settings match (all but --batch-size and --compile). The output file appears only when every prompt is
done (an atomic rename), then the partial files go.

Best-of-N (Snorkel-Mistral-PairRM-DPO's PairRM best-of-16 at inference): `--best-of 16 --reward SPEC` samples 16
responses per prompt, scores them with the reward source SPEC (rewards.SPEC_HELP: a log-ratio pair, PairRM, or
a Python `module:function`) and writes only the best (selection.best_index): each row's "responses" holds that
one response with its "reward", and the row gains "rewards", every sample's reward in sample order.

Every prompt's random streams are keyed by its line number, so the batch a prompt lands in changes none of its
tokens. Batches are cut from all prompts before the ranks share them out, so one process, N ranks and a killed
and resumed run all write the same file, byte for byte (given the same --batch-size: in another
batch shape, floats are summed in another order and a log-prob can differ in its last bits).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import minalign
from minalign import cli, distributed
from minalign.chat import TEMPLATES, end_token_id, render_prompt
from minalign.checkpoint import CheckpointError, check_checkpoint
from minalign.cli import CliError, append_lines, open_partials, partial_entries, write_output
from minalign.data import DataError, as_messages, file_sha256, jsonl_line, prompt_of, read_jsonl
from minalign.progress import Progress
from minalign.rewards import SPEC_HELP, from_spec, parse_spec, score_rows
from minalign.sampling import generate
from minalign.selection import best_index

PARTIAL_FORMAT = "minalign sample.py partial v1"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; a bad flag exits with status 2 and one line (cli.parser)."""
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="HF checkpoint dir (config.json, safetensors, tokenizer files)")
    p.add_argument("--prompts", required=True, help='JSONL of {"id"?, "prompt"} or {"id"?, "messages"} rows')
    p.add_argument("--out", required=True, help="output JSONL; <out>.partial holds progress until it is complete")
    p.add_argument("--template", required=True, choices=sorted(TEMPLATES), help="chat template of the model")
    p.add_argument("--system", default=None,
                   help="system message for rows that have none (merlinite default: the model card's)")
    # "--n" works with plain python only: torchrun's own parser takes it for an abbreviation of its
    # --nnodes/--nproc-per-node and fails, so under torchrun write -n or --num-samples.
    p.add_argument("-n", "--n", "--num-samples", dest="num_samples", type=int, default=None,
                   help="responses per prompt, default 4 (under torchrun: -n or --num-samples)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per response")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus: keep the smallest set with this mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of every prompt's random stream")
    p.add_argument("--stop", nargs="+", action="extend", default=[], metavar="STR",
                   help="stop strings, cut from the text (EOS and the template's end token always stop)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (each with n rows)")
    p.add_argument("--best-of", type=int, default=0, metavar="N",
                   help="sample N responses per prompt and keep the one --reward scores highest (0 = off)")
    p.add_argument("--reward", metavar="SPEC", help="the reward source of --best-of: " + SPEC_HELP)
    cli.add_common_flags(p, rows="prompt")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CUDA graphs on GPU); the first batch pays the compile")
    args = p.parse_args(argv)
    if args.best_of:
        if args.reward is None:
            p.error("--best-of needs --reward SPEC")
        try:
            parse_spec(args.reward)
        except ValueError as e:
            p.error(f"--reward: {e}")
        if args.num_samples not in (None, args.best_of):
            p.error("--best-of N sets the number of samples: leave out -n")
        args.num_samples = args.best_of
    elif args.reward is not None:
        p.error("--reward is for --best-of N")
    if args.num_samples is None:
        args.num_samples = 4
    cli.check_flags(p, args, {"--best-of": args.best_of >= 0, "--num-samples": args.num_samples >= 1,
                              "--max-new-tokens": args.max_new_tokens >= 1, "--temperature": args.temperature >= 0,
                              "--top-k": args.top_k >= 0, "--top-p": 0 < args.top_p <= 1,
                              "--batch-size": args.batch_size >= 1})
    return args


@dataclass
class Job:
    """One prompt to sample: its line in the prompts file, token ids, and output row (responses to come)."""

    line: int
    ids: list[int]
    row: dict


def load_jobs(args: argparse.Namespace, tokenizer, context: int) -> tuple[list[Job], list[DataError]]:
    """Read, validate and render every prompt row; return (jobs in file order, the rows skipped).

    context: the model's max_position_embeddings, which a prompt plus --max-new-tokens must fit in.
    """
    path, system = Path(args.prompts), args.system
    bad = cli.BadRows(args.skip_invalid)
    jobs: list[Job] = []
    seen_ids: dict = {}  # id -> line that first used it
    for line, row in read_jsonl(path, on_error=bad):
        try:
            prompt = prompt_of(row)
            ids = render_prompt(tokenizer, args.template, as_messages(prompt, system))
        except ValueError as e:
            bad(DataError(path, line, str(e)))
            continue
        if len(ids) + args.max_new_tokens > context:
            room = context - len(ids)  # the fix is a smaller --max-new-tokens, when the prompt leaves any room
            fix = f"--max-new-tokens {room} or less fits it" if room > 0 else "the prompt alone fills it"
            bad(DataError(path, line, f"the prompt is {len(ids)} tokens; with --max-new-tokens "
                                      f"{args.max_new_tokens} that exceeds the model's context of {context}: {fix}"))
            continue
        row_id = row.get("id", line)
        if row_id in seen_ids:
            bad(DataError(path, line, f"duplicate id {row_id!r} (first at line {seen_ids[row_id]})"))
            continue
        seen_ids[row_id] = line
        out = {"id": row_id, "prompt": prompt}
        if "source" in row:
            out["source"] = row["source"]
        out["prompt_token_ids"] = ids
        jobs.append(Job(line, ids, out))
    return jobs, bad.skipped


def stop_token_ids(tokenizer, template: str) -> list[int]:
    """The tokenizer's EOS and the token that ends the template's assistant turn, when they exist."""
    end = end_token_id(tokenizer, template)
    return sorted({*([end] if end is not None else []), *([tokenizer.eos_id] if tokenizer.eos_id is not None else [])})


def finished_rows(entries, lines: set[int]) -> dict[int, dict]:
    """Output rows of partial-file entries {"line", "row"} by prompt line, after checking each is a prompt of
    this run. A line may appear twice (a batch redone after a kill in the middle of writing it): the last wins."""
    rows: dict[int, dict] = {}
    for path, number, entry in entries:
        if entry.get("line") not in lines or not isinstance(entry.get("row"), dict):
            raise CliError(f"{path}:{number}: not a finished prompt of this run (a corrupt partial file?); "
                           f"delete it to start over")
        rows[entry["line"]] = entry["row"]
    return rows


def run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> int:
    """Everything after argument parsing, owning --out (cli.run_lock); raises CliError for problems the user can
    fix."""
    with cli.run_lock(Path(args.out), "--out"):
        return _run(args, rank, world, device)


def _run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> int:
    model_dir, prompts_path, out = Path(args.model), Path(args.prompts), Path(args.out)
    main_rank = distributed.is_main()  # messages every rank would print alike come from rank 0 only
    cli.require_checkpoint_dir(model_dir, "--model")
    if not prompts_path.is_file():
        raise CliError(f"--prompts {prompts_path}: no such file")
    if cli.output_done(args, "sample.py", prompts=prompts_path):
        return 0
    try:
        config = check_checkpoint(model_dir)  # config.json against the weights' headers: bad files found now
        tokenizer = minalign.load_tokenizer(model_dir)
    except (OSError, ValueError) as e:
        raise CliError(str(e)) from None
    try:
        stop_ids = stop_token_ids(tokenizer, args.template)
    except ValueError as e:
        raise CliError(f"--template {args.template} does not fit the tokenizer of {model_dir}: {e}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CliError(f"{model_dir}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                       f"{config.vocab_size}: they do not belong together")

    # Every rank reads and validates every row, so all agree on the prompts and on which were skipped.
    jobs, skipped = load_jobs(args, tokenizer, config.max_position_embeddings)
    for err in skipped if main_rank else ():
        print(f"sample.py: skipped {err}", file=sys.stderr)
    if not jobs:
        raise CliError(f"--prompts {prompts_path}: no usable prompt ({len(skipped)} skipped)")
    # Batches are cut from all prompts, longest first (little padding; an out-of-memory error comes at once),
    # and then dealt to the ranks whole. So a prompt is computed in the same batch whatever the number of
    # ranks, and a resumed run computes the very batches an uninterrupted one would: the output is the same
    # file. (Samples never depend on the batch, thanks to the prompt keys, but the last bit of a log-prob can:
    # floats are summed in another order in another shape.)
    by_length = sorted(jobs, key=lambda j: -len(j.ids))
    batches = [by_length[i:i + args.batch_size] for i in range(0, len(by_length), args.batch_size)]
    mine = batches[rank::world]

    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    # What a resume must match: everything that changes a sample. Not --batch-size (samples are keyed by prompt,
    # so a run killed for want of memory can go on with smaller batches) and not --compile.
    settings = dict(model=str(model_dir.resolve()),
                    prompts_sha256=file_sha256(prompts_path),
                    template=args.template, system=args.system, num_samples=args.num_samples,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed,
                    stop=args.stop, dtype=dtype, device=device.type, skip_invalid=args.skip_invalid,
                    world_size=world)

    partial, ours, entries = open_partials(out, rank, world, resume=args.resume, fmt=PARTIAL_FORMAT,
                                           settings=settings)
    done = finished_rows(entries, {j.line for j in jobs})
    # A batch is redone whole if any prompt of it is missing, so it is computed exactly as it was first.
    todo = [batch for batch in mine if any(j.line not in done for j in batch)]
    if done and main_rank:
        print(f"sample.py: resuming: {len(done)} of {len(jobs)} prompts are done", file=sys.stderr)

    reward = None
    if args.best_of and main_rank:  # now, so a reward that cannot be loaded fails before the sampling
        try:
            reward = from_spec(args.reward, device=device)
        except (OSError, ValueError) as e:
            raise CliError(f"--reward: {e}") from None
    try:
        distributed.doing(f"loading {model_dir}")
        model = distributed.fit_threads(minalign.load_model(model_dir, dtype=getattr(torch, dtype), device=device,
                                                           check_finite=True).eval())
    except CheckpointError as e:  # names the file or keys at fault
        raise CliError(str(e)) from None

    bar = Progress(sum(map(len, todo)), enabled=main_rank)
    start, generated = time.perf_counter(), 0
    with open(partial, "ab") as f:
        for i, batch in enumerate(todo):
            distributed.doing(f"sampling batch {i + 1}/{len(todo)}")  # for the frozen-rank message
            results = generate(model, [j.ids for j in batch], n=args.num_samples,
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p,
                               stop_token_ids=stop_ids, stop_strings=args.stop, tokenizer=tokenizer,
                               seed=args.seed, prompt_keys=[j.line for j in batch], compile=args.compile,
                               progress=lambda k: bar.advance(tokens=k))
            lines = []
            for job, samples in zip(batch, results):
                responses = [{"text": s.text, "token_ids": s.token_ids, "logprobs": s.logprobs,
                              "finish_reason": s.finish_reason} for s in samples]
                lines.append(jsonl_line({"line": job.line, "row": {**job.row, "responses": responses}}))
                generated += sum(len(s.token_ids) for s in samples)
            append_lines(f, lines)  # once per batch: a kill loses at most the batch in flight
            bar.advance(items=len(batch))
    bar.close()
    elapsed = time.perf_counter() - start

    # all_sum is also a barrier: once it returns, every rank's partial file is complete.
    (generated,) = distributed.all_sum([generated])
    if main_rank:
        distributed.doing(f"merging the partial files into {out}")
        merged = merge(out, ours, settings, jobs, reward, args.reward)
        # The counts describe the output file; the rate is of the tokens this run generated (all ranks).
        tokens = sum(len(r["token_ids"]) for row in merged for r in row["responses"])
        extra = (f", {len(done)} resumed" if done else "") + (f", skipped {len(skipped)}" if skipped else "")
        print(f"sample.py: prompts {len(merged)}, samples {sum(len(row['responses']) for row in merged)}, "
              f"tokens {tokens}, {generated / max(elapsed, 1e-9):.1f} tokens/s{extra} -> {out}", file=sys.stderr)
    # Leave together: a rank that tears down its process group while another still has it open can abort
    # (seen with gloo: "terminate called without an active exception").
    distributed.barrier()
    return 0


def merge(out: Path, partials: list[Path], settings: dict, jobs: list[Job], reward=None, spec: str = "") -> list[dict]:
    """Write the rows of all partial files to out in input order (atomically), then remove the partials.
    reward: a reward source (from the --reward spec); each row then keeps only its best response (module doc)."""
    rows = finished_rows(partial_entries(partials, PARTIAL_FORMAT, settings), {j.line for j in jobs})
    missing = [j.line for j in jobs if j.line not in rows]
    assert not missing, f"the prompts of lines {missing[:10]} are in no partial file"
    rows = [rows[j.line] for j in jobs]
    if reward is not None:  # the partial files stay until the output is written: a kill here redoes only this
        try:
            scored = score_rows(reward, rows, spec)
        except (OSError, ValueError) as e:
            raise CliError(f"--reward: {e}") from None
        rows = [{**row, "responses": [row["responses"][best_index(row)]],
                 "rewards": [r["reward"] for r in row["responses"]]} for row in scored]
    return write_output(out, rows, partials)


def main(argv: list[str] | None = None) -> int:
    """Run sample.py; returns the exit status (0 done, 2 bad input or settings, 130 interrupted)."""
    return cli.main("sample.py", argv, parse_args, run, kept="finished prompts")


if __name__ == "__main__":
    distributed.exit(main())
