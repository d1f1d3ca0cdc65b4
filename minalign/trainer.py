"""SFT and DPO training on torch.distributed: one code path for a single process and for torchrun's ranks.

    step:  the global batch (train.batch_size rows) → each rank's micro-batches (train.micro_batch_size rows,
           accumulated) → sequence_logprobs (hidden states + lm_head weight, never full logits) → loss → backward
           → clip → AdamW with linear warmup then cosine decay.

Losses are normalised by the *global* batch — SFT by its response-token count, DPO by its number of pairs — and
multiplied by the world size before backward, since DDP and FSDP average gradients over the ranks: so N ranks,
gradient accumulation and one big batch all take the same step (up to float summation order).

Every rank reads and tokenizes the whole data file, so each knows every batch and its counts without talking.
Batches are grouped by length: each epoch's shuffled rows are taken GROUP_BATCHES batches at a time, sorted by
length and cut into batches, whose order is shuffled again; inside a batch, micro-batches are contiguous in
length. The plan is a function of (seed, epoch), so the data position of a resumed run is its step count.

DPO's reference log-probs are computed once, before training, by the reference model alone (the ranks share the
pairs), and cached beside the data file; the reference is then freed, so one model is in memory while training.

Randomness: the model has no dropout and the data plan has its own generator; torch's RNG is still reseeded at
every step from (seed, step, rank), so any future random op resumes exactly without RNG state on disk.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.utils.checkpoint import checkpoint

import minalign
from minalign import distributed
from minalign.chat import TEMPLATES, end_token_id, render_conversation, render_prompt
from minalign.checkpoint import CheckpointError, check_checkpoint
from minalign.cli import (BadRows, CliError, changed_settings, cut_torn_line, read_settings, require_checkpoint_dir,
                          run_lock)
from minalign.data import DataError, as_messages, atomic_write, file_mode, file_sha256, jsonl_line, messages_of, prompt_of, read_jsonl
from minalign.logprobs import sequence_logprobs
from minalign.losses import LOSS_TYPES, dpo_loss, dpo_metrics, sft_loss
from minalign.progress import Progress
from minalign.rewards import release_memory

GROUP_BATCHES = 16  # batches sorted by length together: less padding, still a shuffled order
MAX_SEED = 2**31  # seeds are mixed with steps and epochs (seed · 1_000_003 + ...) and must stay within int64
REF_FORMAT = "minalign reference log-probs v1"


# ----------------------------------------------------------------------------------------------- configuration

@dataclass
class ModelSection:
    path: str = ""  # HF checkpoint dir of the initial policy, with its tokenizer files
    template: str = "mistral"  # chat template (minalign.chat.TEMPLATES)
    reference: str = ""  # DPO reference checkpoint dir; "" = the initial policy


@dataclass
class DataSection:
    path: str = ""  # JSONL: SFT {"messages"} or {"prompt", "response"}; DPO {"prompt", "chosen", "rejected"}
    max_length: int = 1024  # prompt + response tokens
    max_prompt_length: int = 512  # a longer prompt loses tokens from its left (its first token, BOS, is kept)
    skip_invalid: bool = False  # report and skip bad rows instead of stopping at the first


@dataclass
class TrainSection:
    mode: str = "sft"  # "sft" or "dpo"
    out: str = ""  # the run dir: checkpoints/, metrics.jsonl, final/
    steps: int = 100  # optimizer steps in all
    batch_size: int = 8  # rows (DPO: pairs) per optimizer step, over all ranks
    micro_batch_size: int = 2  # rows per forward on one rank; accumulation = batch / (world · micro)
    lr: float = 1e-5  # peak learning rate (after warmup)
    min_lr_ratio: float = 0.1  # the cosine ends at lr · min_lr_ratio
    warmup_steps: int = 0  # linear warmup from 0 to lr over these steps
    weight_decay: float = 0.0  # on matrices and embeddings, not on norms
    adam_betas: list = field(default_factory=lambda: [0.9, 0.95])  # AdamW's (β1, β2)
    adam_eps: float = 1e-8  # AdamW's ε
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    seed: int = 0  # data order and torch's RNG (reseeded every step)
    log_every: int = 1  # steps between metrics.jsonl records
    save_every: int = 0  # 0 = only the final checkpoint
    keep_checkpoints: int = 2  # newest checkpoints kept in <out>/checkpoints
    stop_after: int = 0  # stop (with a checkpoint) after this many steps in this invocation; 0 = run to `steps`
    resume: bool = False  # continue from <out>/latest.json
    parallel: str = "ddp"  # under torchrun: "ddp" (replicated weights) or "fsdp" (FSDP2, sharded per layer)
    mixed_precision: bool = True  # bf16 autocast on CUDA; always fp32 on CPU
    activation_checkpointing: bool = False  # recompute each decoder layer in backward
    device: str = ""  # "cpu" or "cuda"; "" = cuda if available


@dataclass
class DPOSection:
    beta: float = 0.1  # strength of the pull toward the reference (IPO: τ)
    loss_type: str = "sigmoid"  # sigmoid | ipo (on per-token mean log-ratios, as TRL) | hinge
    label_smoothing: float = 0.0  # sigmoid: the chance a preference label is flipped (conservative DPO)


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    dpo: DPOSection = field(default_factory=DPOSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | None, overrides: list[tuple[str, str]] = ()) -> TrainConfig:
    """A TrainConfig from a TOML file ([model], [data], [train], [dpo] tables) and `section.key value` overrides
    (cli.read_settings), checked."""
    cfg = read_settings(TrainConfig(), path, overrides)
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """CliError for a value out of range or a required path left empty."""
    t, d = cfg.train, cfg.data
    floats = {"train.lr": t.lr, "train.min_lr_ratio": t.min_lr_ratio, "train.weight_decay": t.weight_decay,
              "train.adam_eps": t.adam_eps, "train.grad_clip": t.grad_clip, "dpo.beta": cfg.dpo.beta,
              "dpo.label_smoothing": cfg.dpo.label_smoothing}
    problems = {
        f"{', '.join(k for k, v in floats.items() if not math.isfinite(v))} must be finite":
            not all(map(math.isfinite, floats.values())),
        "train.mode must be sft or dpo": t.mode not in ("sft", "dpo"),
        "model.path is required": not cfg.model.path, "data.path is required": not d.path,
        "train.out is required": not t.out,
        f"model.template must be one of {sorted(TEMPLATES)}": cfg.model.template not in TEMPLATES,
        "train.parallel must be ddp or fsdp": t.parallel not in ("ddp", "fsdp"),
        "train.device must be cpu, cuda or empty": t.device not in ("", "cpu", "cuda"),
        "train.device cuda: torch sees no CUDA device": t.device == "cuda" and not torch.cuda.is_available(),
        "train.steps, batch_size, micro_batch_size, log_every must be >= 1":
            min(t.steps, t.batch_size, t.micro_batch_size, t.log_every) < 1,
        f"train.seed must be in [0, {MAX_SEED})": not 0 <= t.seed < MAX_SEED,
        "train.lr must be > 0": t.lr <= 0, "train.warmup_steps must be >= 0": t.warmup_steps < 0,
        "train.min_lr_ratio must be in [0, 1]": not 0 <= t.min_lr_ratio <= 1,
        "train.weight_decay must be >= 0": t.weight_decay < 0, "train.adam_eps must be > 0": t.adam_eps <= 0,
        "train.adam_betas must be two numbers in [0, 1)": len(t.adam_betas) != 2 or
            not all(0 <= b < 1 for b in t.adam_betas),
        "train.grad_clip, save_every, stop_after must be >= 0": min(t.grad_clip, t.save_every, t.stop_after) < 0,
        "train.keep_checkpoints must be >= 1": t.keep_checkpoints < 1,
        "data.max_prompt_length must be >= 1 and < data.max_length": not 1 <= d.max_prompt_length < d.max_length,
        f"dpo.loss_type must be one of {LOSS_TYPES}": cfg.dpo.loss_type not in LOSS_TYPES,
        "dpo.beta must be > 0": cfg.dpo.beta <= 0,
        "dpo.label_smoothing must be in [0, 0.5)": not 0 <= cfg.dpo.label_smoothing < 0.5}
    bad = [msg for msg, wrong in problems.items() if wrong]
    if bad:
        raise CliError("; ".join(bad))


# ------------------------------------------------------------------------------------------------------- data

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


def _prompt_messages(row: dict) -> list[dict]:
    prompt = prompt_of({k: row[k] for k in ("prompt", "id") if k in row} if "prompt" in row else row)
    return as_messages(prompt)


def _reply(row: dict, key: str, prompt: list[dict]) -> str:
    """The assistant reply of a DPO row's chosen/rejected: a string, or a conversation that is the prompt's
    messages plus the reply (UltraFeedback-binarized)."""
    value = row.get(key)
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError(f'"{key}" must be a string or a list of messages, got {type(value).__name__}')
    messages = messages_of(value, key)
    if messages[-1]["role"] != "assistant":
        raise ValueError(f'"{key}" must end with an assistant message')
    if messages[:-1] != prompt:
        raise ValueError(f'"{key}": the conversation before its last reply differs from "prompt"')
    return messages[-1]["content"]


def _sft_example(row: dict, tokenizer, template: str) -> tuple[list[int], list[int], list[bool]]:
    if "messages" in row:
        messages = messages_of(row["messages"], "messages")
    else:
        if not isinstance(row.get("response"), str):
            raise ValueError('an SFT row needs "messages", or "prompt" and a "response" string')
        messages = _prompt_messages(row) + [{"role": "assistant", "content": row["response"]}]
    ids, labels = render_conversation(tokenizer, template, messages)
    if True not in labels:
        raise ValueError("no assistant reply to train on")
    first = labels.index(True)
    return ids[:first], ids[first:], labels[first:]


def _dpo_example(row: dict, tokenizer, template: str, end: int | None) -> tuple[list[int], list[int], list[int]]:
    if not all(k in row for k in ("prompt", "chosen", "rejected")):
        raise ValueError(f'a DPO row needs "prompt", "chosen" and "rejected"; got keys {sorted(row)}')
    prompt = _prompt_messages(row)
    # render_prompt + encode(reply) + end token is exactly the rendered conversation (chat.py's tokenization rule:
    # each reply is a segment of its own), so chosen and rejected share the prompt's ids.
    ids = render_prompt(tokenizer, template, prompt)
    replies = [tokenizer.encode(_reply(row, k, prompt)) + ([end] if end is not None else [])
               for k in ("chosen", "rejected")]
    return ids, replies[0], replies[1]


def load_examples(cfg: TrainConfig, tokenizer) -> tuple[list[Example], DataStats]:
    """Read, validate, tokenize and truncate every row of data.path; errors name path:line."""
    path, d = Path(cfg.data.path), cfg.data
    if not path.is_file():
        raise CliError(f"data.path {path}: no such file")
    bad = BadRows(d.skip_invalid, switch="--data.skip_invalid true")
    stats = DataStats()
    end = end_token_id(tokenizer, cfg.model.template)
    examples = []
    for line, row in read_jsonl(path, on_error=bad):
        stats.rows += 1
        try:
            if cfg.train.mode == "sft":
                prompt, response, mask = _sft_example(row, tokenizer, cfg.model.template)
                rejected = None
            else:
                prompt, response, rejected = _dpo_example(row, tokenizer, cfg.model.template, end)
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
        raise CliError(f"data.path {path}: no usable rows ({stats.rows} read, {stats.skipped_invalid} invalid, "
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


def reference_logprobs(cfg: TrainConfig, examples: list[Example], world: int, rank: int, device: torch.device,
                       autocast) -> tuple[torch.Tensor, bool]:
    """([N, 2] fp32 reference log-prob sums of (chosen, rejected), whether they came from the cache).

    The cache, <data>.ref-logps.jsonl, is a header {"format", "data_sha256", "reference", "template",
    "max_length", "max_prompt_length", "device"} and one {"line", "chosen", "rejected"} per pair; it is used when
    every one of those matches. Otherwise the ranks compute their share (pairs r, r + world, …, in chunks of
    micro_batch_size, the same number of forwards on every rank, as FSDP needs) and rank 0 writes it atomically.
    """
    data = Path(cfg.data.path)
    reference = Path(cfg.model.reference or cfg.model.path)
    header = {"format": REF_FORMAT, "data_sha256": file_sha256(data), "reference": str(reference.resolve()),
              "template": cfg.model.template, "max_length": cfg.data.max_length,
              "max_prompt_length": cfg.data.max_prompt_length, "device": device.type}
    cache = reference_cache_path(data)
    if cache.is_file():
        rows = [row for _, row in read_jsonl(cache)]
        if rows and rows[0] == header and [r.get("line") for r in rows[1:]] == [e.line for e in examples]:
            return torch.tensor([[r["chosen"], r["rejected"]] for r in rows[1:]], dtype=torch.float32), True
    try:
        sharded = cfg.train.parallel == "fsdp" and world > 1  # shard_model moves the weights to the device
        model = distributed.fit_threads(minalign.load_model(reference, device="cpu" if sharded else device,
                                                           check_finite=True).eval())
    except CheckpointError as e:
        raise CliError(f"reference {reference}: {e}") from None
    if sharded:
        model = distributed.shard_model(model, device)
    values = torch.zeros(len(examples), 2, dtype=torch.float32, device=device)
    mine = list(range(rank, len(examples), world))
    m = cfg.train.micro_batch_size
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
                sums, _ = sequence_logprobs(model, prompts, responses, batch_tokens=len(prompts) * cfg.data.max_length)
            if idx:
                values[idx, 0], values[idx, 1] = sums[:len(idx)].float(), sums[len(idx):].float()
            bar.advance(items=len(idx), tokens=sum(map(len, prompts)) + sum(map(len, responses)))
    bar.close()
    del model
    release_memory()
    values = distributed.all_sum_tensor(values).cpu()  # each pair was computed by one rank, zeros elsewhere
    if not torch.isfinite(values).all():
        raise CliError(f"reference {reference}: non-finite log-probs")
    if distributed.is_main():
        rows = [header] + [{"line": e.line, "chosen": v[0], "rejected": v[1]}
                           for e, v in zip(examples, values.tolist())]
        atomic_write(cache, "".join(map(jsonl_line, rows)))
    distributed.barrier()
    return values, False


# --------------------------------------------------------------------------------------------- model set-up

def checkpoint_layers(model: minalign.Transformer) -> None:
    """Activation checkpointing, applied from outside the model: each decoder layer's forward becomes a
    torch.utils.checkpoint call of itself, so its activations are recomputed in backward instead of kept.
    Parameter names (and so the checkpoint keys) do not change."""
    for layer in model.model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def wrap_model(model: minalign.Transformer, cfg: TrainConfig, world: int, device: torch.device):
    """The model as trained on this rank: activation checkpointing, then DDP or FSDP2 (torchtitan's order)."""
    if cfg.train.activation_checkpointing:
        checkpoint_layers(model)
    if world == 1:
        return model.to(device)
    if cfg.train.parallel == "fsdp":
        return distributed.shard_model(model, device)
    return torch.nn.parallel.DistributedDataParallel(model.to(device),
                                                     device_ids=[device.index] if device.type == "cuda" else None)


def core_module(model) -> minalign.Transformer:
    """The Transformer inside a DDP wrapper (FSDP2 shards the module in place)."""
    return getattr(model, "module", model)


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in core_module(model).named_parameters():
        (no_decay if name.endswith("norm.weight") else decay).append(p)
    t = cfg.train
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps)


def lr_at(step: int, t: TrainSection) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup over warmup_steps, then a cosine from
    lr down to lr · min_lr_ratio at the last step."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.steps - 1 - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# -------------------------------------------------------------------------------------------------- checkpoints

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_checkpoint(run: Path, step: int, model, optimizer, state: dict, keep: int) -> Path | None:
    """Write <run>/checkpoints/step_<step> and point <run>/latest.json at it; all ranks call it (gathering an
    FSDP model is a collective), rank 0 writes.

    The checkpoint is an HF model dir (loadable as is) plus optimizer.safetensors (every tensor of AdamW's state,
    keyed "<param name>/<name>"), optimizer.json (the param groups and the non-tensor state) and
    trainer_state.json. It is assembled in a temp dir and renamed into place, and latest.json is replaced
    atomically after that, so a kill at any moment leaves the last complete checkpoint as the latest.
    """
    distributed.doing(f"writing checkpoint step {step}")  # rank 0 writes while the others wait
    weights = get_model_state_dict(model, options=FULL)
    optim = get_optimizer_state_dict(model, optimizer, options=FULL)
    final = None
    if distributed.is_main():
        ckpts = run / "checkpoints"
        ckpts.mkdir(parents=True, exist_ok=True)
        final = ckpts / f"step_{step:06d}"
        tmp = ckpts / f".tmp-step_{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        with torch.device("meta"):
            cpu_model = minalign.Transformer(core_module(model).config)
        cpu_model.load_state_dict(weights, assign=True, strict=True)
        minalign.save_model(cpu_model, tmp)
        tensors, meta = {}, {"param_groups": optim["param_groups"], "state": {}}
        for name, entry in optim["state"].items():
            meta["state"][name] = {}
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}/{key}"] = value.contiguous()
                    meta["state"][name][key] = "tensor"
                else:
                    meta["state"][name][key] = value
        save_file(tensors, tmp / "optimizer.safetensors")
        os.chmod(tmp / "optimizer.safetensors", file_mode())  # safetensors writes 0600: the umask's mode instead
        (tmp / "optimizer.json").write_text(json.dumps(meta, indent=1) + "\n")
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=1) + "\n")
        for f in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)  # a checkpoint of this step that latest.json never pointed at
        os.replace(tmp, final)
        atomic_write(run / "latest.json", json.dumps({"checkpoint": str(final.relative_to(run)), "step": step}) + "\n")
        old = sorted((p for p in ckpts.iterdir() if p.name.startswith("step_") and p.name[5:].isdigit() and p != final),
                     key=lambda p: int(p.name[5:]))  # by number: step_1000000 sorts after step_999999
        for p in old[:max(0, len(old) - keep + 1)]:
            shutil.rmtree(p, ignore_errors=True)
    distributed.barrier()
    return final


def latest_checkpoint(run: Path) -> Path | None:
    """The checkpoint <run>/latest.json points at, or None."""
    latest = run / "latest.json"
    if not latest.is_file():
        return None
    return run / json.loads(latest.read_text())["checkpoint"]


def load_optimizer(ckpt: Path, model, optimizer) -> None:
    """Restore AdamW's state from a checkpoint written by save_checkpoint (no pickle: safetensors + JSON)."""
    meta = json.loads((ckpt / "optimizer.json").read_text())
    with safe_open(ckpt / "optimizer.safetensors", framework="pt", device="cpu") as f:
        state = {name: {key: f.get_tensor(f"{name}/{key}") if value == "tensor" else value
                        for key, value in entry.items()} for name, entry in meta["state"].items()}
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": meta["param_groups"]},
                             options=StateDictOptions(full_state_dict=True))


# ------------------------------------------------------------------------------------------------ training

class TrainingError(CliError):
    """Training cannot go on (a non-finite loss): nothing of the failed step is saved."""


def open_policy(cfg: TrainConfig):
    """The policy's tokenizer, after checking the model dirs, that the template fits the tokenizer and that
    data.max_length fits the model's context (CliError naming the key) — found before any work, not in the first
    forward after the reference pass."""
    for key in ("path", "reference"):
        if getattr(cfg.model, key):
            require_checkpoint_dir(getattr(cfg.model, key), f"model.{key}")
    try:
        tokenizer = minalign.load_tokenizer(cfg.model.path)
        context = check_checkpoint(cfg.model.path).max_position_embeddings  # bad weight files found now
        if cfg.model.reference:
            check_checkpoint(cfg.model.reference)
    except (OSError, ValueError) as e:
        raise CliError(f"model.path {cfg.model.path}: {e}") from None
    try:
        end_token_id(tokenizer, cfg.model.template)  # renders a reply: the template's tokens must exist
    except ValueError as e:
        raise CliError(f"model.template {cfg.model.template!r} does not fit the tokenizer of {cfg.model.path}: "
                       f"{e}") from None
    if cfg.data.max_length > context:
        raise CliError(f"data.max_length {cfg.data.max_length} exceeds the context of {context} tokens of "
                       f"{cfg.model.path}: give data.max_length {context} or less")
    return tokenizer


def _micro_batches(batch: list[int], m: int, world: int, rank: int) -> list[list[int]]:
    """This rank's micro-batches of a global batch (sorted by length): contiguous runs of m rows, dealt out."""
    runs = [batch[i:i + m] for i in range(0, len(batch), m)]
    return runs[rank::world]


def run_settings(cfg: TrainConfig, world: int) -> dict:
    """What a resume must share with the run it continues (the rest — logging, saving, parallelism — may change).
    train.steps stays: the warmup and cosine are laid over it, so more steps would make the learning rate rise
    again in the middle of a run."""
    c = cfg.to_dict()
    for k in ("log_every", "save_every", "keep_checkpoints", "stop_after", "resume", "micro_batch_size",
              "parallel", "activation_checkpointing", "device"):
        c["train"].pop(k)
    return c


def train(cfg: TrainConfig, rank: int = 0, world: int = 1, device: torch.device | None = None) -> dict:
    """Run (or resume) the training cfg describes, owning train.out meanwhile (cli.run_lock); return a summary
    {"step", "final", "losses", ...}."""
    with run_lock(Path(cfg.train.out), "train.out", make_parent=True):
        return _train(cfg, rank, world, device)


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device | None) -> dict:
    device = device or torch.device("cpu")
    t = cfg.train
    run = Path(t.out)
    main = distributed.is_main()
    if t.batch_size % (world * t.micro_batch_size):
        raise CliError(f"train.batch_size {t.batch_size} must be a multiple of world size {world} × "
                       f"train.micro_batch_size {t.micro_batch_size}")
    accum = t.batch_size // (world * t.micro_batch_size)
    if t.parallel == "fsdp" and world == 1 and main:
        print("train.py: train.parallel = fsdp needs torchrun with 2+ processes; training unsharded", file=sys.stderr)
    use_bf16 = t.mixed_precision and device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    ckpt = latest_checkpoint(run)
    if ckpt is not None and not t.resume:
        raise CliError(f"{run} holds a run already ({ckpt}); set train.resume = true (--train.resume true) to "
                       f"continue it, or choose another train.out")
    tokenizer = open_policy(cfg)
    examples, stats = load_examples(cfg, tokenizer)
    settings = {**run_settings(cfg, world), "data_sha256": file_sha256(Path(cfg.data.path))}
    start, prev = 0, None
    if ckpt is not None:
        prev = json.loads((ckpt / "trainer_state.json").read_text())
        if prev["settings"] != settings:
            diffs = ["the data file" if k == "data_sha256" else k for k in changed_settings(prev["settings"], settings)]
            start_from = run / "final" if (run / "final").is_dir() else ckpt  # either is an HF model dir
            why = (f" (train.steps {prev['settings']['train'].get('steps')} then: the learning-rate schedule is laid over "
                   f"it; to train on, start a new run from {start_from} with --model.path)"
                   if "train.steps" in diffs else "")
            raise CliError(f"{ckpt} was written with other settings ({', '.join(diffs)}); resume with the same "
                           f"ones{why}")
        start = prev["step"]
    if start == t.steps and ckpt is not None and not (run / "final").is_dir():
        # killed after the last checkpoint but before final/ was in place: finish the export, train nothing
        final = _write_final(run, tokenizer)
        if main:
            print(f"train.py: {start} steps were done already; wrote the missing {final}", file=sys.stderr)
        return {"step": start, "losses": [], "final": final, "stats": stats}
    if start >= t.steps:
        raise CliError(f"{run} has done {start} steps already (train.steps = {t.steps})")
    if main:
        run.mkdir(parents=True, exist_ok=True)
        identical = f" and {stats.skipped_identical} with chosen identical to rejected" if t.mode == "dpo" else ""
        print(f"train.py: {t.mode} on {len(examples)} rows of {cfg.data.path} ({stats.skipped_invalid} invalid"
              f"{identical} skipped; truncated: {stats.truncated_prompts} prompts, {stats.truncated_responses} "
              f"responses), {world} process(es), {accum} micro-batch(es) of {t.micro_batch_size} per step",
              file=sys.stderr)

    ref = None
    if t.mode == "dpo":
        ref, cached = reference_logprobs(cfg, examples, world, rank, device, autocast)
        if main:
            print(f"train.py: reference log-probs {'from the cache' if cached else 'computed and cached'} in "
                  f"{reference_cache_path(Path(cfg.data.path))}", file=sys.stderr)
        ref = ref.to(device)

    # The policy: from the checkpoint being resumed, else the initial one; fp32 master weights.
    source = ckpt if ckpt is not None else Path(cfg.model.path)
    try:
        policy = distributed.fit_threads(minalign.load_model(source, dtype=torch.float32, device="cpu",
                                                           check_finite=True))
    except CheckpointError as e:
        raise CliError(str(e)) from None
    core = policy
    model = wrap_model(policy, cfg, world, device)
    model.train()
    optimizer = make_optimizer(model, cfg)
    if ckpt is not None:
        load_optimizer(ckpt, model, optimizer)
    if main and ckpt is None and (run / "metrics.jsonl").is_file():  # a run killed before its first checkpoint
        (run / "metrics.jsonl").unlink()
    if main and ckpt is not None:  # metrics of steps after the checkpoint were lost with the run that made them
        metrics = run / "metrics.jsonl"
        if metrics.is_file():
            cut_torn_line(metrics)  # a record torn by a full disk or a power loss, as the partial files get
            kept = [json.dumps(r) + "\n" for _, r in read_jsonl(metrics) if r.get("step", 0) <= start]
            atomic_write(metrics, "".join(kept))
        print(f"train.py: resuming from {ckpt} at step {start}", file=sys.stderr)

    lengths = [e.length() for e in examples]
    per_epoch = len(epoch_batches(lengths, t.batch_size, t.seed, 0))
    if per_epoch == 0:
        raise CliError(f"{len(examples)} usable rows do not fill one batch of train.batch_size {t.batch_size}")
    coef = core.config.router_aux_loss_coef if core.config.is_moe else 0.0
    end = t.steps if not t.stop_after else min(t.steps, start + t.stop_after)
    bar = Progress(end - start, unit="steps", enabled=main)
    losses, plan, plan_epoch = [], [], -1
    step = start
    for step in range(start, end):
        distributed.doing(f"training step {step + 1}/{end}")
        torch.manual_seed(t.seed * 1_000_003 + step * world + rank)
        epoch = step // per_epoch
        if epoch != plan_epoch:
            plan, plan_epoch = epoch_batches(lengths, t.batch_size, t.seed, epoch), epoch
        batch = plan[step % per_epoch]
        if t.mode == "sft":
            denom = sum(sum(examples[i].mask) for i in batch)  # the global batch's target tokens
        else:
            denom = len(batch)
        lr = lr_at(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        began = time.perf_counter()
        local_loss = torch.zeros((), device=device)
        local_aux = torch.zeros((), device=device)
        rewards = torch.zeros(len(batch), 2, device=device)  # DPO: (chosen, rejected) at each pair's place
        micro = _micro_batches(batch, t.micro_batch_size, world, rank)
        for k, mb in enumerate(micro):
            last = k == len(micro) - 1
            sync = contextlib.nullcontext() if last or world == 1 else _no_sync(model)
            with sync:
                rows = [examples[i] for i in mb]
                with autocast():
                    if t.mode == "sft":
                        sums, _, aux = sequence_logprobs(
                            model, [e.prompt for e in rows], [e.response for e in rows],
                            response_masks=[e.mask for e in rows], return_aux_loss=True,
                            batch_tokens=len(rows) * cfg.data.max_length)
                        loss = sft_loss(sums, denom)
                    else:
                        n = len(rows)
                        sums, counts, aux = sequence_logprobs(
                            model, [e.prompt for e in rows] * 2, [e.response for e in rows] + [e.rejected for e in rows],
                            return_aux_loss=True, batch_tokens=2 * n * cfg.data.max_length)
                        ref_mb = ref[mb]
                        pair_losses, chosen_r, rejected_r = dpo_loss(
                            sums[:n], sums[n:], ref_mb[:, 0], ref_mb[:, 1], cfg.dpo.beta, cfg.dpo.loss_type,
                            cfg.dpo.label_smoothing, chosen_lengths=counts[:n], rejected_lengths=counts[n:])
                        loss = pair_losses.sum() / denom
                        places = torch.tensor([batch.index(i) for i in mb], device=device)
                        rewards[places] = torch.stack([chosen_r, rejected_r], dim=1).float()
                # × world: DDP/FSDP average gradients over the ranks, and this loss is a share of a global sum.
                (loss * world + coef * aux / accum).backward()
            local_loss += loss.detach().float()
            local_aux += aux.detach().float() / accum
        step_loss = distributed.all_sum_tensor(local_loss).item()
        aux_loss = distributed.all_sum_tensor(local_aux).item() / world
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        grad_norm = grad_norm.item()
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm) and math.isfinite(aux_loss)):
            raise TrainingError(f"step {step + 1}: non-finite loss {step_loss} / grad norm {grad_norm}; stopping "
                                f"before the optimizer step (the last checkpoint in {run} is intact; try a lower "
                                f"train.lr or train.mixed_precision = false)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        tokens = sum(len(examples[i].prompt) + len(examples[i].response) + len(examples[i].rejected or ())
                     for i in batch)
        seconds = time.perf_counter() - began
        bar.advance(items=1, tokens=tokens)
        done = step + 1
        if done % t.log_every == 0 or done == end:
            record = {"step": done, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens / max(seconds, 1e-9), "epoch": epoch}
            if coef:
                record["aux_loss"] = aux_loss
            if t.mode == "dpo":
                r = distributed.all_sum_tensor(rewards)
                record.update(dpo_metrics(r[:, 0], r[:, 1]))
            if main:
                with open(run / "metrics.jsonl", "a") as f:
                    f.write(jsonl_line(record))
                bar.print("train.py: " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in record.items()))
        if (t.save_every and done % t.save_every == 0) or done == end:
            state = {"settings": settings, "epoch": done // per_epoch, "batch_in_epoch": done % per_epoch,
                     "rows_seen": done * t.batch_size, "data_stats": dataclasses.asdict(stats)}
            save_checkpoint(run, done, model, optimizer, state, t.keep_checkpoints)
    bar.close()

    final = None
    if end == t.steps:  # the finished model, in HF layout with its tokenizer
        final = _write_final(run, tokenizer)
        if main:
            print(f"train.py: {end} steps, final loss {losses[-1]:.4f} -> {final}", file=sys.stderr)
    elif main:
        print(f"train.py: stopped after step {end} of {t.steps}; --train.resume true continues", file=sys.stderr)
    return {"step": end, "losses": losses, "final": final, "stats": stats}


def _write_final(run: Path, tokenizer) -> Path:
    """<run>/final: the latest checkpoint's model in HF layout with the tokenizer files, assembled in a temp dir
    and renamed into place (all ranks call it, rank 0 writes)."""
    final = run / "final"
    distributed.doing("writing the final model")
    if distributed.is_main():
        tmp = run / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        minalign.save_model(minalign.load_model(latest_checkpoint(run)), tmp)
        tokenizer.save(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    distributed.barrier()
    return final


def _no_sync(model):
    """Skip the gradient all-reduce of a non-final micro-batch (DDP's no_sync; FSDP2's requires_gradient_sync)."""
    if hasattr(model, "no_sync"):
        return model.no_sync()
    return _FSDPNoSync(model)


class _FSDPNoSync:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.model.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        self.model.set_requires_gradient_sync(True)
