"""The sample stage: N responses per prompt from the policy with the KV-cache sampler, prompts.jsonl -> samples.jsonl.

    python sample.py --model DIR --prompts prompts.jsonl --out samples.jsonl --template merlinite -n 4
    torchrun --nproc_per_node 8 sample.py ...      # prompts split across ranks, one merged output file

Input rows: {"id"?, "prompt": str} or {"id"?, "messages": [{"role", "content"}, ...]}, optional "source".
A row without an id gets its line number in the prompts file (an int, the number error messages print).
Output, one row per prompt in input order:
    {"id", "prompt", "source"?, "prompt_token_ids", "responses": [{"text", "token_ids", "logprobs", "finish_reason"}]}

Resume (runs.Partials): finished prompts are appended to <out>.partial (<out>.partial.rank<r> under torchrun) and
fsynced, at most a second apart; the file's first line records the settings. `--resume` continues from it, after
checking the settings match (all but --batch-size and --compile). The output file appears only when every prompt
is done (an atomic rename), then the partial files go.

Best-of-N (Snorkel-Mistral-PairRM-DPO's PairRM best-of-16 at inference): `--best-of 16 --reward SPEC` samples 16
responses per prompt, scores them with the reward source SPEC (rewards.SPEC_HELP: a log-ratio pair, PairRM, or
a Python `module:function`) and writes only the best (select.best_index): each row's "responses" holds that
one response with its "reward", and the row gains "rewards", every sample's reward in sample order.

Continuous batching (sampling.stream): --batch-size slots decode side by side, and a finished sample's slot takes
the next waiting one at once. Every prompt's random streams are keyed by its line number, so neither its
neighbours nor the number of slots change its tokens; and a dense model computes every row in the same shapes
whatever its neighbours, so one process, N ranks and a killed and resumed run all write the same file, byte for
byte, given the same --batch-size (with another, a log-prob can differ in its last bits; with Mixtral, whose
experts see the neighbours, too).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import minalign
from minalign import distributed
from minalign.chat import TEMPLATES, end_token_id, render_prompt
from minalign.checkpoint import check_checkpoint, require_dir
from minalign.data import file_sha256, jsonl_line
from minalign.errors import ConfigError, DataError, MinalignError
from minalign.progress import Progress
from minalign.rewards import SPEC_HELP, from_spec, parse_spec, score_rows
from minalign.rows import BadRows, as_messages, prompt_rows
from minalign.runs import Partials, StageOptions, check_ranges, output_done, owning_out
from minalign.sampling import stream
from minalign.select import best_index
from minalign.settings import flag

PARTIAL_FORMAT = "minalign sample.py partial v1"


@dataclass
class SampleSection:
    """How to sample: the [sample] table of a loop config, and sample.py's flags of the same names."""

    n: int = flag(4, "-n", "--n", "--num-samples")  # responses per prompt (under torchrun: -n or --num-samples)
    max_new_tokens: int = 256  # most tokens a response may have (then it is cut: finish_reason "length")
    temperature: float = 0.7  # of the policy's samples (0 = greedy)
    top_k: int = 0  # sample from the k likeliest tokens only (0 = all)
    top_p: float = 1.0  # nucleus: sample from the likeliest tokens whose probabilities sum to top_p (1 = off)
    batch_size: int = 16  # decode slots: samples in flight at once, each refilled as it finishes; the KV cache is slots × (longest prompt + max_new_tokens) tokens (or × the window), 2·layers·kv_heads·head_dim·dtype bytes each: 128 KiB for Mistral-7B in bf16


@dataclass(kw_only=True)
class SampleConfig(StageOptions):
    """Everything the sample stage reads: sample.py's flags, or what the loop sets for a round."""

    model: str = flag()  # HF checkpoint dir (config.json, safetensors, tokenizer files)
    prompts: str = flag()  # JSONL of {"id"?, "prompt"} or {"id"?, "messages"} rows
    out: str = flag()  # output JSONL; <out>.partial holds progress until it is complete
    template: str = flag(choices=sorted(TEMPLATES))  # chat template of the model
    system: str | None = None  # system message for rows that have none (merlinite default: the model card's)
    sample: SampleSection = field(default_factory=SampleSection)
    seed: int = 0  # seed of every prompt's random stream
    stop: list = flag([], metavar="STR")  # stop strings, cut from the text (EOS and the template's end token always stop)
    best_of: int = flag(0, metavar="N")  # sample N responses per prompt and keep the one --reward scores highest (0 = off)
    reward: str | None = flag(None, metavar="SPEC", help="the reward source of --best-of: " + SPEC_HELP)  # see SPEC_HELP
    compile: bool = False  # torch.compile the decode step (CUDA graphs on GPU); the first batch pays the compile


def check_config(cfg: SampleConfig) -> None:
    """ConfigError naming the flag of a setting out of range or a flag without the one it needs."""
    s = cfg.sample
    if cfg.best_of and cfg.reward is None:
        raise ConfigError("--best-of needs --reward SPEC")
    if cfg.reward is not None and not cfg.best_of:
        raise ConfigError("--reward is for --best-of N")
    if cfg.reward is not None:
        try:
            parse_spec(cfg.reward)
        except ValueError as e:
            raise ConfigError(f"--reward: {e}") from None
    check_ranges({"--best-of": cfg.best_of >= 0, "--num-samples": s.n >= 1, "--max-new-tokens": s.max_new_tokens >= 1,
                  "--temperature": s.temperature >= 0, "--top-k": s.top_k >= 0, "--top-p": 0 < s.top_p <= 1,
                  "--batch-size": s.batch_size >= 1}, cfg)


@dataclass
class SampleJob:
    """One prompt to sample: its line in the prompts file, token ids, and output row (responses to come)."""

    line: int
    ids: list[int]
    row: dict


def prompt_renderer(tokenizer, template: str, system: str | None, max_new_tokens: int, context: int,
                    budget: str = "--max-new-tokens", model: str = "the model's"):
    """The function from a prompt to its token ids as this stage feeds them to the policy: rendered in the
    template (ValueError for roles it refuses) and leaving max_new_tokens of the model's context (ValueError
    naming budget, the setting to lower, when it does not)."""
    def render(prompt) -> list[int]:
        ids = render_prompt(tokenizer, template, as_messages(prompt, system))
        if len(ids) + max_new_tokens > context:
            room = context - len(ids)  # the fix is a smaller budget, when the prompt leaves any room
            fix = f"{budget} {room} or less fits it" if room > 0 else "the prompt alone fills it"
            raise ValueError(f"the prompt is {len(ids)} tokens in the {template} template; with {budget} "
                             f"{max_new_tokens} that exceeds {model} context of {context}: {fix}")
        return ids
    return render


def load_jobs(cfg: SampleConfig, tokenizer, context: int) -> tuple[list[SampleJob], list[DataError]]:
    """Read, validate and render every prompt row; return (jobs in file order, the rows skipped)."""
    bad = BadRows(cfg.skip_invalid)
    render = prompt_renderer(tokenizer, cfg.template, cfg.system, cfg.sample.max_new_tokens, context)
    jobs = []
    for line, row, ids in prompt_rows(Path(cfg.prompts), bad, render):
        out = {"id": row["id"], "prompt": row["prompt"] if "prompt" in row else row["messages"]}
        if "source" in row:
            out["source"] = row["source"]
        out["prompt_token_ids"] = ids
        jobs.append(SampleJob(line, ids, out))
    return jobs, bad.skipped


def stop_token_ids(tokenizer, template: str) -> list[int]:
    """The tokenizer's EOS and the token that ends the template's assistant turn, when they exist."""
    end = end_token_id(tokenizer, template)
    return sorted({*([end] if end is not None else []), *([tokenizer.eos_id] if tokenizer.eos_id is not None else [])})


def finished_rows(entries, lines: set[int]) -> dict[int, dict]:
    """Output rows of partial-file entries {"line", "row"} by prompt line, after checking each is a prompt of
    this run. A line may appear twice (written again after a kill in the middle of writing it): the last wins."""
    rows: dict[int, dict] = {}
    for path, number, entry in entries:
        if entry.get("line") not in lines or not isinstance(entry.get("row"), dict):
            raise DataError(path, number, "not a finished prompt of this run (a corrupt partial file?); delete it "
                                          "to start over")
        rows[entry["line"]] = entry["row"]
    return rows


def open_model(cfg: SampleConfig):
    """(model config, tokenizer, stop ids) of --model, checked against each other and --template before any work
    (the caller has checked that --model is a directory)."""
    model_dir = Path(cfg.model)
    config = check_checkpoint(model_dir)  # config.json against the weights' headers: bad files found now
    tokenizer = minalign.load_tokenizer(model_dir)
    try:
        stop_ids = stop_token_ids(tokenizer, cfg.template)
    except ValueError as e:
        raise ConfigError(f"--template {cfg.template} does not fit the tokenizer of {model_dir}: {e}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"{model_dir}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                          f"{config.vocab_size}: they do not belong together")
    return config, tokenizer, stop_ids


def sample(cfg: SampleConfig, rank: int = 0, world: int = 1, device: torch.device | None = None) -> Path:
    """Run (or resume) the sample stage cfg describes, owning cfg.out meanwhile (runs.run_lock); returns cfg.out."""
    check_config(cfg)
    return owning_out(_sample, cfg, rank, world, device)


def _sample(cfg: SampleConfig, rank: int, world: int, device: torch.device) -> None:
    prompts_path, out, s = Path(cfg.prompts), Path(cfg.out), cfg.sample
    main_rank = distributed.is_main()  # messages every rank would print alike come from rank 0 only
    require_dir(cfg.model, "--model")
    if not prompts_path.is_file():
        raise ConfigError(f"--prompts {prompts_path}: no such file")
    if output_done(out, "sample.py", resume=cfg.resume, overwrite=cfg.overwrite, prompts=prompts_path):
        return
    config, tokenizer, stop_ids = open_model(cfg)

    # Every rank reads and validates every row, so all agree on the prompts and on which were skipped.
    jobs, skipped = load_jobs(cfg, tokenizer, config.max_position_embeddings)
    for err in skipped if main_rank else ():
        print(f"sample.py: skipped {err}", file=sys.stderr)
    if not jobs:
        raise MinalignError(f"--prompts {prompts_path}: no usable prompt ({len(skipped)} skipped)")
    # The prompts, longest first (an out-of-memory error comes at once), are dealt to the ranks one by one; each
    # rank decodes its share in --batch-size slots, refilled as samples finish. A sample's tokens never depend on
    # its neighbours (the prompt keys), and for a dense model neither do the bits of its log-probs at a given
    # number of slots: so one process, N ranks and a resumed run write the same file (sampling.py says why).
    mine = sorted(jobs, key=lambda j: -len(j.ids))[rank::world]

    dtype = cfg.weights_dtype(device)
    # What a resume must match: everything that changes a sample. Not --batch-size (samples are keyed by prompt,
    # so a run killed for want of memory can go on with fewer slots) and not --compile.
    settings = dict(model=str(Path(cfg.model).resolve()), prompts_sha256=file_sha256(prompts_path),
                    template=cfg.template, system=cfg.system, num_samples=s.n, max_new_tokens=s.max_new_tokens,
                    temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=cfg.seed, stop=cfg.stop,
                    dtype=dtype, device=device.type, skip_invalid=cfg.skip_invalid, world_size=world)
    partials = Partials(out, rank, world, resume=cfg.resume, fmt=PARTIAL_FORMAT, settings=settings)
    done = finished_rows(partials.entries, {j.line for j in jobs})
    todo = [j for j in mine if j.line not in done]
    if done and main_rank:
        print(f"sample.py: resuming: {len(done)} of {len(jobs)} prompts are done", file=sys.stderr)

    reward = None
    if cfg.best_of and main_rank:  # now, so a reward that cannot be loaded fails before the sampling
        try:
            reward = from_spec(cfg.reward, device=device)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--reward: {e}") from None
    distributed.doing(f"loading {cfg.model}")
    model = distributed.fit_threads(minalign.load_model(cfg.model, dtype=getattr(torch, dtype), device=device,
                                                       check_finite=True).eval())

    start = time.perf_counter()
    with partials.appender() as append:
        generated = sample_prompts(model, tokenizer, stop_ids, todo, cfg, append, max(len(j.ids) for j in jobs))
    elapsed = time.perf_counter() - start

    # all_sum is also a barrier: once it returns, every rank's partial file is complete.
    (generated,) = distributed.all_sum([generated])
    if main_rank:
        distributed.doing(f"merging the partial files into {out}")
        merged = merge(partials, jobs, reward, cfg.reward)
        # The counts describe the output file; the rate is of the tokens this run generated (all ranks).
        tokens = sum(len(r["token_ids"]) for row in merged for r in row["responses"])
        extra = (f", {len(done)} resumed" if done else "") + (f", skipped {len(skipped)}" if skipped else "")
        print(f"sample.py: prompts {len(merged)}, samples {sum(len(row['responses']) for row in merged)}, "
              f"tokens {tokens}, {generated / max(elapsed, 1e-9):.1f} tokens/s{extra} -> {out}", file=sys.stderr)
    # Leave together: a rank that tears down its process group while another still has it open can abort
    # (seen with gloo: "terminate called without an active exception").
    distributed.barrier()


FLUSH_SECONDS = 1.0  # finished prompts are appended to the partial file at most this often (the first at once):
# a kill loses ~1 s of work, and a run killed early keeps what it finished


def sample_prompts(model, tokenizer, stop_ids: list[int], jobs: list[SampleJob], cfg: SampleConfig, append,
                   longest: int) -> int:
    """Sample every job in --batch-size slots, appending finished rows to the partial file (append) as prompts
    complete; returns the tokens generated. longest: the longest prompt of the whole run (all ranks, done ones
    too), which sizes the KV cache, so the decode shapes do not depend on the share or the resume."""
    s, generated, lines, flushed = cfg.sample, 0, [], -FLUSH_SECONDS  # the first finished prompt goes at once
    if not jobs:  # this rank's share is done already
        return 0
    bar = Progress(len(jobs), enabled=distributed.is_main())
    distributed.doing(f"sampling {len(jobs)} prompts")  # for the frozen-rank message
    samples_of = stream(model, [j.ids for j in jobs], n=s.n, max_new_tokens=s.max_new_tokens,
                        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, stop_token_ids=stop_ids,
                        stop_strings=cfg.stop, tokenizer=tokenizer, seed=cfg.seed,
                        prompt_keys=[j.line for j in jobs], slots=s.batch_size, compile=cfg.compile,
                        longest_prompt=longest,
                        progress=lambda k: bar.advance(tokens=k, status=f"{k}/{s.batch_size} slots"))
    try:
        for i, samples in samples_of:
            responses = [{"text": x.text, "token_ids": x.token_ids, "logprobs": x.logprobs,
                          "finish_reason": x.finish_reason} for x in samples]
            lines.append(jsonl_line({"line": jobs[i].line, "row": {**jobs[i].row, "responses": responses}}))
            generated += sum(len(x.token_ids) for x in samples)
            bar.advance(items=1)
            if time.perf_counter() - flushed >= FLUSH_SECONDS:
                append(lines)
                lines, flushed = [], time.perf_counter()
    finally:  # also on Ctrl-C or an error: what is finished is kept for --resume
        append(lines)
    bar.close()
    return generated


def merge(partials: Partials, jobs: list[SampleJob], reward=None, spec: str = "") -> list[dict]:
    """Write the rows of all partial files to out in input order (atomically), then remove the partials.
    reward: a reward source (from the --reward spec); each row then keeps only its best response (module doc)."""
    rows = finished_rows(partials.read(), {j.line for j in jobs})
    missing = [j.line for j in jobs if j.line not in rows]
    assert not missing, f"the prompts of lines {missing[:10]} are in no partial file"
    rows = [rows[j.line] for j in jobs]
    if reward is not None:  # the partial files stay until the output is written: a kill here redoes only this
        try:
            scored = score_rows(reward, rows, spec)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--reward: {e}") from None
        rows = [{**row, "responses": [row["responses"][best_index(row)]],
                 "rewards": [r["reward"] for r in row["responses"]]} for row in scored]
    return partials.commit(rows)
