"""The trainer's data: training rows (rows.py) → token ids (Example) → the epoch's length-grouped batches, and DPO's
reference log-probs, computed once and cached beside the data file.

Truncation: a prompt over data.max_prompt_length loses tokens from its left (its first token, the BOS, stays); then
the response keeps what fits in data.max_length. A DPO pair whose chosen and rejected are the same tokens after
that is skipped (it has no preference to learn).

Batches are grouped by length: each epoch's shuffled rows are taken GROUP_BATCHES batches at a time, sorted by
length and cut into batches, whose order is shuffled again. The plan is a function of (seed, epoch), so the data
position of a resumed run is its step count.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import minalign
from minalign import distributed
from minalign.chat import end_token_id, render_conversation, render_prompt
from minalign.data import atomic_write, file_sha256, jsonl_line, read_jsonl
from minalign.errors import ConfigError, DataError, MinalignError, TrainingError
from minalign.logprobs import sequence_logprobs
from minalign.parallel import shard_model
from minalign.progress import Progress
from minalign.rows import BadRows, dpo_parts, sft_messages

GROUP_BATCHES = 16  # batches sorted by length together: less padding, still a shuffled order
REF_FORMAT = "minalign reference log-probs v1"


@dataclass
class DataSection:
    path: str = ""  # JSONL: SFT {"messages"} or {"prompt", "response"}; DPO {"prompt", "chosen", "rejected"}
    max_length: int = 1024  # prompt + response tokens
    max_prompt_length: int = 512  # a longer prompt loses tokens from its left (its first token, BOS, is kept)
    skip_invalid: bool = False  # report and skip bad rows instead of stopping at the first


@dataclass
class Example:
    """One training row as token ids. SFT: response and its target mask; DPO: response = chosen, and rejected."""

    line: int
    prompt: list[int]
    response: list[int]
    mask: list[bool] | None = None  # SFT: which response tokens are targets (replies); None = all
    rejected: list[int] | None = None

    def length(self) -> int:
        return len(self.prompt) + max(len(self.response), len(self.rejected or ()))


@dataclass
class DataStats:
    rows: int = 0
    skipped_invalid: int = 0
    skipped_identical: int = 0  # DPO pairs whose chosen and rejected are the same tokens (after truncation)
    truncated_prompts: int = 0
    truncated_responses: int = 0


def _truncate(prompt: list[int], response: list[int], d: DataSection, stats: DataStats) -> tuple[list[int], int]:
    """The rule: a prompt over max_prompt_length loses tokens from its left (its first token, the BOS, stays);
    then the response keeps what fits in max_length. Returns (prompt, response length kept); counts both."""
    if len(prompt) > d.max_prompt_length:
        prompt = prompt[:1] + prompt[len(prompt) - d.max_prompt_length + 1:]
        stats.truncated_prompts += 1
    room = d.max_length - len(prompt)
    if len(response) > room:
        stats.truncated_responses += 1
    return prompt, min(len(response), room)


def _sft_example(row: dict, tokenizer, template: str) -> tuple[list[int], list[int], list[bool]]:
    ids, labels = render_conversation(tokenizer, template, sft_messages(row))
    if True not in labels:
        raise ValueError("no assistant reply to train on")
    first = labels.index(True)
    return ids[:first], ids[first:], labels[first:]


def _dpo_example(row: dict, tokenizer, template: str, end: int | None) -> tuple[list[int], list[int], list[int]]:
    prompt, chosen, rejected = dpo_parts(row)
    # render_prompt + encode(reply) + end token is exactly the rendered conversation (chat.py's tokenization rule:
    # each reply is a segment of its own), so chosen and rejected share the prompt's ids.
    ids = render_prompt(tokenizer, template, prompt)
    replies = [tokenizer.encode(reply) + ([end] if end is not None else []) for reply in (chosen, rejected)]
    return ids, replies[0], replies[1]


def load_examples(d: DataSection, mode: str, template: str, tokenizer) -> tuple[list[Example], DataStats]:
    """Read, validate, tokenize and truncate every row of data.path (mode "sft" or "dpo", in the policy's
    template); errors name path:line."""
    path = Path(d.path)
    if not path.is_file():
        raise ConfigError(f"data.path {path}: no such file")
    bad = BadRows(d.skip_invalid, switch="--data.skip_invalid true")
    stats = DataStats()
    end = end_token_id(tokenizer, template)
    examples = []
    for line, row in read_jsonl(path, on_error=bad):
        stats.rows += 1
        try:
            if mode == "sft":
                prompt, response, mask = _sft_example(row, tokenizer, template)
                rejected = None
            else:
                prompt, response, rejected = _dpo_example(row, tokenizer, template, end)
                mask = None
        except ValueError as e:
            bad(DataError(path, line, str(e)))
            continue
        prompt, keep = _truncate(prompt, response, d, stats)
        response, mask = response[:keep], mask[:keep] if mask is not None else None
        if rejected is not None:
            _, keep = _truncate(prompt, rejected, dataclasses.replace(d, max_prompt_length=len(prompt)), stats)
            rejected = rejected[:keep]
            if rejected == response:
                stats.skipped_identical += 1
                continue
        examples.append(Example(line, prompt, response, mask, rejected))
    stats.skipped_invalid = len(bad.skipped)
    for err in bad.skipped if distributed.is_main() else ():
        print(f"train.py: skipped {err}", file=sys.stderr)
    if not examples:
        raise MinalignError(f"data.path {path}: no usable rows ({stats.rows} read, {stats.skipped_invalid} invalid, "
                            f"{stats.skipped_identical} with chosen identical to rejected)")
    return examples, stats


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This epoch's global batches (indices, each sorted longest first); the last incomplete batch is dropped."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    batches = []
    group = batch_size * GROUP_BATCHES
    for g in range(0, len(order), group):
        rows = sorted(order[g:g + group], key=lambda i: -lengths[i])
        cut = [rows[b:b + batch_size] for b in range(0, len(rows), batch_size)]
        batches += [cut[k] for k in torch.randperm(len(cut), generator=gen).tolist()]
    return [b for b in batches if len(b) == batch_size]



# ---------------------------------------------------------------------------------------- reference log-probs

def reference_cache_path(data: Path) -> Path:
    return data.with_name(data.name + ".ref-logps.jsonl")


def reference_logprobs(reference: Path, template: str, d: DataSection, chunk: int, sharded: bool,
                       examples: list[Example], world: int, rank: int, device: torch.device,
                       autocast) -> tuple[torch.Tensor, bool]:
    """([N, 2] fp32 reference log-prob sums of (chosen, rejected), whether they came from the cache).

    The cache, <data>.ref-logps.jsonl, is a header {"format", "data_sha256", "reference", "template",
    "max_length", "max_prompt_length", "device"} and one {"line", "chosen", "rejected"} per pair; it is used when
    every one of those matches. Otherwise the ranks compute their share (pairs r, r + world, …, in chunks of
    `chunk` pairs — the micro-batch size —, the same number of forwards on every rank, as FSDP needs; sharded:
    the reference is sharded over the ranks) and rank 0 writes it atomically.
    """
    data = Path(d.path)
    header = {"format": REF_FORMAT, "data_sha256": file_sha256(data), "reference": str(reference.resolve()),
              "template": template, "max_length": d.max_length, "max_prompt_length": d.max_prompt_length,
              "device": device.type}
    cache = reference_cache_path(data)
    if cache.is_file():
        rows = [row for _, row in read_jsonl(cache)]
        if rows and rows[0] == header and [r.get("line") for r in rows[1:]] == [e.line for e in examples]:
            return torch.tensor([[r["chosen"], r["rejected"]] for r in rows[1:]], dtype=torch.float32), True
    # sharded: memory-mapped on the CPU, shard_model moves only this rank's shards to the device
    model = distributed.fit_threads(minalign.load_model(reference, device="cpu" if sharded else device,
                                                       check_finite=True).eval())
    if sharded:
        model = shard_model(model, device)
    values = torch.zeros(len(examples), 2, dtype=torch.float32, device=device)
    mine = list(range(rank, len(examples), world))
    m = chunk
    chunks = math.ceil(math.ceil(len(examples) / world) / m)
    bar = Progress(len(mine), unit="pairs (reference)", enabled=distributed.is_main())
    with torch.no_grad():
        for c in range(chunks):
            distributed.doing(f"reference log-probs, chunk {c + 1}/{chunks}")
            idx = mine[c * m:(c + 1) * m]
            prompts = [examples[i].prompt for i in idx] * 2
            responses = [examples[i].response for i in idx] + [examples[i].rejected for i in idx]
            if not idx:  # out of pairs: a dummy forward keeps FSDP's collectives in step
                prompts, responses = [[0]], [[0]]
            with autocast():
                sums, _ = sequence_logprobs(model, prompts, responses, batch_tokens=len(prompts) * d.max_length)
            if idx:
                values[idx, 0], values[idx, 1] = sums[:len(idx)].float(), sums[len(idx):].float()
            bar.advance(items=len(idx), tokens=sum(map(len, prompts)) + sum(map(len, responses)))
    bar.close()
    del model
    distributed.release_memory()
    values = distributed.all_sum_tensor(values).cpu()  # each pair was computed by one rank, zeros elsewhere
    if not torch.isfinite(values).all():
        raise TrainingError(f"reference {reference}: non-finite log-probs")
    if distributed.is_main():
        rows = [header] + [{"line": e.line, "chosen": v[0], "rejected": v[1]}
                           for e, v in zip(examples, values.tolist())]
        atomic_write(cache, "".join(map(jsonl_line, rows)))
    distributed.barrier()
    return values, False
