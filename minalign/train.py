"""SFT and DPO training on torch.distributed: one code path for a single process and for torchrun's ranks.

    step:  the global batch (train.batch_size rows) → each rank's micro-batches (train.micro_batch_size rows,
           accumulated) → sequence_logprobs (hidden states + lm_head weight, never full logits) → loss → backward
           → clip → AdamW with linear warmup then cosine decay.

Losses are normalised by the *global* batch — SFT by its response-token count, DPO by its number of pairs — and
multiplied by the world size before backward, since DDP and FSDP average gradients over the ranks: so N ranks,
gradient accumulation and one big batch all take the same step (up to float summation order).

Every rank reads and tokenizes the whole data file (examples.py), so each knows every batch and its counts without
talking; inside a batch, micro-batches are contiguous in length. The plan is a function of (seed, epoch), so the
data position of a resumed run is its step count. DPO's reference log-probs are computed once, before training,
by the reference model alone, and cached beside the data file (examples.reference_logprobs); the reference is then
freed, so one model is in memory while training. SimPO (dpo.loss_type simpo) is reference-free: no reference is
loaded and nothing is cached.

The step is `train_step`: forward, loss, backward and clip over one global batch; `_train` around it resumes,
logs metrics.jsonl and writes the checkpoints (checkpoint.save_checkpoint) and final/.

Randomness: the model has no dropout and the data plan has its own generator; torch's RNG is still reseeded at
every step from (seed, step, rank), so any future random op resumes exactly without RNG state on disk.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import minalign
from minalign import distributed
from minalign.chat import TEMPLATES, end_token_id
from minalign.checkpoint import check_checkpoint, require_dir
from minalign.data import file_sha256, jsonl_line
from minalign.errors import CheckpointError, ConfigError, RunError, TrainingError
from minalign.examples import (DataSection, Example, epoch_batches, load_examples, reference_cache_path,
                               reference_logprobs)
from minalign.logprobs import sequence_logprobs
from minalign.parallel import core_module, no_sync, wrap_model
from minalign.losses import LOSS_TYPES, dpo_loss, dpo_metrics, sft_loss
from minalign.progress import Progress
from minalign.runs import run_lock
from minalign.settings import read_settings
from minalign.train_state import (latest_checkpoint, load_optimizer, resume_point, rewind_metrics, run_settings,
                                  save_checkpoint, write_final)

MAX_SEED = 2**31  # seeds are mixed with steps and epochs (seed · 1_000_003 + ...) and must stay within int64


# ----------------------------------------------------------------------------------------------- configuration

@dataclass
class ModelSection:
    path: str = ""  # HF checkpoint dir of the initial policy, with its tokenizer files
    template: str = "mistral"  # chat template (minalign.chat.TEMPLATES)
    reference: str = ""  # DPO reference checkpoint dir; "" = the initial policy


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
    mixed_precision: bool = True  # bf16 on CUDA over fp32 master weights (autocast; with parallel fsdp, FSDP2's bf16 MixedPrecisionPolicy); always fp32 on CPU
    activation_checkpointing: bool = False  # recompute each decoder layer in backward
    device: str = ""  # "cpu" or "cuda"; "" = cuda if available


@dataclass
class DPOSection:
    beta: float = 0.1  # strength of the pull toward the reference (IPO: τ)
    loss_type: str = "sigmoid"  # sigmoid | ipo (on per-token mean log-ratios, as TRL) | hinge | rdpo (length-regularised) | simpo (reference-free): losses.py
    label_smoothing: float = 0.0  # sigmoid: the chance a preference label is flipped (conservative DPO)
    alpha: float = 0.0  # rdpo: α, the margin granted per token the chosen response is longer (the R-DPO paper: 0.01-0.05 at β 0.1)
    gamma: float = 0.5  # simpo: γ, the target reward margin (TRL's simpo_gamma; the SimPO paper pairs β 2-2.5 with γ/β 0.3-0.6)


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    dpo: DPOSection = field(default_factory=DPOSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(source: str | dict | None, overrides: list[tuple[str, str]] = ()) -> TrainConfig:
    """A TrainConfig from a TOML file (or its tables: [model], [data], [train], [dpo]) and `section.key value`
    overrides (settings.read_settings), checked."""
    cfg = read_settings(TrainConfig(), source, overrides)
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """ConfigError for a value out of range or a required path left empty."""
    t, d = cfg.train, cfg.data
    floats = {"train.lr": t.lr, "train.min_lr_ratio": t.min_lr_ratio, "train.weight_decay": t.weight_decay,
              "train.adam_eps": t.adam_eps, "train.grad_clip": t.grad_clip, "dpo.beta": cfg.dpo.beta,
              "dpo.label_smoothing": cfg.dpo.label_smoothing, "dpo.alpha": cfg.dpo.alpha, "dpo.gamma": cfg.dpo.gamma}
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
        "dpo.label_smoothing must be in [0, 0.5)": not 0 <= cfg.dpo.label_smoothing < 0.5,
        "dpo.label_smoothing applies to the sigmoid loss only": cfg.dpo.label_smoothing > 0
            and cfg.dpo.loss_type != "sigmoid",
        "dpo.alpha must be >= 0": cfg.dpo.alpha < 0,
        "dpo.loss_type rdpo needs dpo.alpha > 0 (with 0 it is the sigmoid loss)":
            cfg.dpo.loss_type == "rdpo" and cfg.dpo.alpha == 0,
        "dpo.loss_type simpo is reference-free: leave model.reference empty (in a loop: loop.dpo_reference "
        "previous)": t.mode == "dpo" and cfg.dpo.loss_type == "simpo" and bool(cfg.model.reference)}
    bad = [msg for msg, wrong in problems.items() if wrong]
    if bad:
        raise ConfigError("; ".join(bad))


# --------------------------------------------------------------------------------------------- model set-up

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


def open_policy(cfg: TrainConfig):
    """The policy's tokenizer, after checking the model dirs, that the template fits the tokenizer and that
    data.max_length fits the model's context (an error naming the key) — found before any work, not in the first
    forward after the reference pass."""
    for key in ("path", "reference"):
        if getattr(cfg.model, key):
            require_dir(getattr(cfg.model, key), f"model.{key}")
    try:
        tokenizer = minalign.load_tokenizer(cfg.model.path)
        context = check_checkpoint(cfg.model.path).max_position_embeddings  # bad weight files found now
        if cfg.model.reference:
            check_checkpoint(cfg.model.reference)
    except (OSError, ValueError) as e:  # the message names the file; the key names the setting
        raise CheckpointError(f"model.path {cfg.model.path}: {e}") from None
    try:
        end_token_id(tokenizer, cfg.model.template)  # renders a reply: the template's tokens must exist
    except ValueError as e:
        raise ConfigError(f"model.template {cfg.model.template!r} does not fit the tokenizer of {cfg.model.path}: "
                       f"{e}") from None
    if cfg.data.max_length > context:
        raise ConfigError(f"data.max_length {cfg.data.max_length} exceeds the context of {context} tokens of "
                       f"{cfg.model.path}: give data.max_length {context} or less")
    return tokenizer


def _reference(cfg: TrainConfig, examples: list[Example], world: int, rank: int, device: torch.device, autocast):
    """DPO's reference log-prob sums [N, 2] (chosen, rejected) on the device: from the cache beside the data file,
    or computed by the reference model (the initial policy unless model.reference) and cached."""
    reference = Path(cfg.model.reference or cfg.model.path)
    ref, cached = reference_logprobs(reference, cfg.model.template, cfg.data, cfg.train.micro_batch_size,
                                     cfg.train.parallel == "fsdp" and world > 1, examples, world, rank, device,
                                     autocast)
    if distributed.is_main():
        print(f"train.py: reference log-probs {'from the cache' if cached else 'computed and cached'} in "
              f"{reference_cache_path(Path(cfg.data.path))}", file=sys.stderr)
    return ref.to(device)


def bf16(t: TrainSection, world: int, device: torch.device) -> tuple[bool, bool]:
    """(bf16 autocast for the DPO reference pass and the policy, FSDP2's bf16 MixedPrecisionPolicy for the policy
    instead of autocast): train.mixed_precision on CUDA; the policy under FSDP, where autocast over fp32
    weights would all-gather fp32 (parallel.shard_model)."""
    on = t.mixed_precision and device.type == "cuda"
    return on, on and t.parallel == "fsdp" and world > 1


def _policy(cfg: TrainConfig, ckpt: Path | None, world: int, device: torch.device):
    """(the policy as trained on this rank, its AdamW, the router aux loss's weight): from the checkpoint being
    resumed (optimizer state too), else the initial policy; fp32 master weights."""
    policy = distributed.fit_threads(minalign.load_model(ckpt if ckpt is not None else cfg.model.path,
                                                       dtype=torch.float32, device="cpu", check_finite=True))
    coef = policy.config.router_aux_loss_coef if policy.config.is_moe else 0.0
    model = wrap_model(policy, cfg.train.parallel, cfg.train.activation_checkpointing, world, device,
                       mixed_precision=bf16(cfg.train, world, device)[1])
    model.train()
    optimizer = make_optimizer(model, cfg)
    if ckpt is not None:
        load_optimizer(ckpt, model, optimizer)
    return model, optimizer, coef


# ------------------------------------------------------------------------------------------------ training

def train(cfg: TrainConfig, rank: int = 0, world: int = 1, device: torch.device | None = None) -> dict:
    """Run (or resume) the training cfg describes, owning train.out meanwhile (runs.run_lock); return a summary
    {"step", "final", "losses", "stats"}."""
    with run_lock(Path(cfg.train.out), "train.out", make_parent=True):
        return _train(cfg, rank, world, device or torch.device("cpu"))


def _open_run(cfg: TrainConfig, run: Path, world: int):
    """(tokenizer, examples, data stats, the run's settings, the checkpoint to resume or None, its step): the
    policy and data checked and read, and a run dir's checkpoints checked against train.resume and the settings.
    A finished run is refused; one killed between its last checkpoint and final/ gives start == train.steps."""
    t = cfg.train
    if not t.resume and (ckpt := latest_checkpoint(run)) is not None:
        raise RunError(f"{run} holds a run already ({ckpt}); set train.resume = true "
                       f"(--train.resume true) to continue it, or choose another train.out")
    tokenizer = open_policy(cfg)
    examples, stats = load_examples(cfg.data, t.mode, cfg.model.template, tokenizer)
    settings = {**run_settings(cfg, world), "data_sha256": file_sha256(Path(cfg.data.path))}
    ckpt, start = resume_point(run, settings)
    if start >= t.steps and not (start == t.steps and ckpt is not None and not (run / "final").is_dir()):
        raise RunError(f"{run} has done {start} steps already (train.steps = {t.steps})")
    return tokenizer, examples, stats, settings, ckpt, start


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> dict:
    t, run, main = cfg.train, Path(cfg.train.out), distributed.is_main()
    if t.batch_size % (world * t.micro_batch_size):
        raise ConfigError(f"train.batch_size {t.batch_size} must be a multiple of world size {world} × "
                          f"train.micro_batch_size {t.micro_batch_size}")
    accum = t.batch_size // (world * t.micro_batch_size)
    if t.parallel == "fsdp" and world == 1 and main:
        print("train.py: train.parallel = fsdp needs torchrun with 2+ processes; training unsharded", file=sys.stderr)
    use_bf16, fsdp_bf16 = bf16(t, world, device)

    def autocast():  # the reference pass's
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def policy_autocast():  # FSDP2's policy casts the gathered weights itself
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16 and not fsdp_bf16)

    tokenizer, examples, stats, settings, ckpt, start = _open_run(cfg, run, world)
    if start == t.steps:
        # killed after the last checkpoint but before final/ was in place: finish the export, train nothing
        final = write_final(run, tokenizer)
        if main:
            print(f"train.py: {start} steps were done already; wrote the missing {final}", file=sys.stderr)
        return {"step": start, "losses": [], "final": final, "stats": stats}
    if main:
        run.mkdir(parents=True, exist_ok=True)
        identical = f" and {stats.skipped_identical} with chosen identical to rejected" if t.mode == "dpo" else ""
        print(f"train.py: {t.mode} on {len(examples)} rows of {cfg.data.path} ({stats.skipped_invalid} invalid"
              f"{identical} skipped; truncated: {stats.truncated_prompts} prompts, {stats.truncated_responses} "
              f"responses), {world} process(es), {accum} micro-batch(es) of {t.micro_batch_size} per step",
              file=sys.stderr)

    needs_ref = t.mode == "dpo" and cfg.dpo.loss_type != "simpo"  # SimPO has no reference at all
    ref = _reference(cfg, examples, world, rank, device, autocast) if needs_ref else None
    model, optimizer, coef = _policy(cfg, ckpt, world, device)
    if main:
        rewind_metrics(run, ckpt, start)

    lengths = [e.length() for e in examples]
    per_epoch = len(epoch_batches(lengths, t.batch_size, t.seed, 0))
    if per_epoch == 0:
        raise ConfigError(f"{len(examples)} usable rows do not fill one batch of train.batch_size {t.batch_size}")
    end = t.steps if not t.stop_after else min(t.steps, start + t.stop_after)
    bar = Progress(end - start, unit="steps", enabled=main)
    losses, plan, plan_epoch = [], [], -1
    for step in range(start, end):
        distributed.doing(f"training step {step + 1}/{end}")
        torch.manual_seed(t.seed * 1_000_003 + step * world + rank)
        epoch = step // per_epoch
        if epoch != plan_epoch:
            plan, plan_epoch = epoch_batches(lengths, t.batch_size, t.seed, epoch), epoch
        batch, lr, began = plan[step % per_epoch], lr_at(step, t), time.perf_counter()
        loss, aux_loss, grad_norm, rewards = train_step(model, optimizer, lr, [examples[i] for i in batch],
                                                        ref[batch] if ref is not None else None, cfg, coef, accum,
                                                        world, rank, device, policy_autocast)
        if not (math.isfinite(loss) and math.isfinite(grad_norm) and math.isfinite(aux_loss)):
            raise TrainingError(f"step {step + 1}: non-finite loss {loss} / grad norm {grad_norm}; stopping "
                                f"before the optimizer step (the last checkpoint in {run} is intact; try a lower "
                                f"train.lr or train.mixed_precision = false)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        tokens = sum(len(examples[i].prompt) + len(examples[i].response) + len(examples[i].rejected or ())
                     for i in batch)
        bar.advance(items=1, tokens=tokens)
        done = step + 1
        if done % t.log_every == 0 or done == end:
            record = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens / max(time.perf_counter() - began, 1e-9), "epoch": epoch}
            _log(run, bar, record, aux_loss if coef else None, rewards if t.mode == "dpo" else None)
        if (t.save_every and done % t.save_every == 0) or done == end:
            state = {"settings": settings, "epoch": done // per_epoch, "batch_in_epoch": done % per_epoch,
                     "rows_seen": done * t.batch_size, "data_stats": dataclasses.asdict(stats)}
            save_checkpoint(run, done, model, optimizer, state, t.keep_checkpoints)
    bar.close()

    final = None
    if end == t.steps:  # the finished model, in HF layout with its tokenizer
        final = write_final(run, tokenizer)
        if main:
            print(f"train.py: {end} steps, final loss {losses[-1]:.4f} -> {final}", file=sys.stderr)
    elif main:
        print(f"train.py: stopped after step {end} of {t.steps}; --train.resume true continues", file=sys.stderr)
    return {"step": end, "losses": losses, "final": final, "stats": stats}


def _log(run: Path, bar: Progress, record: dict, aux_loss: float | None, rewards: torch.Tensor | None) -> None:
    """Append a step's record to metrics.jsonl and print it (rank 0), with the router's aux loss (Mixtral) and
    DPO's reward metrics (summed over the ranks: each rank holds its own pairs')."""
    if aux_loss is not None:
        record["aux_loss"] = aux_loss
    if rewards is not None:
        r = distributed.all_sum_tensor(rewards)
        record.update(dpo_metrics(r[:, 0], r[:, 1]))
    if distributed.is_main():
        with open(run / "metrics.jsonl", "a") as f:
            f.write(jsonl_line(record))
        bar.print("train.py: " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in record.items()))


def train_step(model, optimizer, lr: float, rows: list[Example], ref: torch.Tensor | None, cfg: TrainConfig,
               coef: float, accum: int, world: int, rank: int, device: torch.device, autocast):
    """One optimizer step's forward, loss and backward over the global batch `rows` (this rank's micro-batches of
    it), and the gradient clip; the caller steps the optimizer once the loss is known to be finite.

    SFT: loss = −Σ log π(response tokens) / the global batch's target tokens. DPO: loss = Σ dpo_loss(pairs) / the
    global batch's pairs, against ref [B, 2] (the reference's chosen, rejected sums; None for simpo). Returns
    (loss, router aux loss, grad norm, rewards [B, 2]: DPO's implicit (chosen, rejected) rewards at this rank's
    pairs, 0 elsewhere).
    """
    t = cfg.train
    for group in optimizer.param_groups:
        group["lr"] = lr
    denom = sum(sum(e.mask) for e in rows) if t.mode == "sft" else len(rows)
    local_loss = torch.zeros((), device=device)
    local_aux = torch.zeros((), device=device)
    rewards = torch.zeros(len(rows), 2, device=device)
    micro = _micro_batches(list(range(len(rows))), t.micro_batch_size, world, rank)
    for k, mb in enumerate(micro):
        sync = contextlib.nullcontext() if k == len(micro) - 1 or world == 1 else no_sync(model)
        with sync:
            part = [rows[i] for i in mb]
            with autocast():
                if t.mode == "sft":
                    out = sequence_logprobs(model, [e.prompt for e in part], [e.response for e in part],
                                            response_masks=[e.mask for e in part],
                                            batch_tokens=len(part) * cfg.data.max_length)
                    loss = sft_loss(out.sums, denom)
                else:
                    n = len(part)
                    out = sequence_logprobs(model, [e.prompt for e in part] * 2,
                                            [e.response for e in part] + [e.rejected for e in part],
                                            batch_tokens=2 * n * cfg.data.max_length)
                    ref_w, ref_l = (None, None) if ref is None else (ref[mb, 0], ref[mb, 1])
                    pair_losses, chosen_r, rejected_r = dpo_loss(
                        out.sums[:n], out.sums[n:], ref_w, ref_l, cfg.dpo.beta, cfg.dpo.loss_type,
                        cfg.dpo.label_smoothing, chosen_lengths=out.counts[:n], rejected_lengths=out.counts[n:],
                        alpha=cfg.dpo.alpha, gamma=cfg.dpo.gamma)
                    loss = pair_losses.sum() / denom
                    rewards[mb] = torch.stack([chosen_r, rejected_r], dim=1).float()
            # × world: DDP/FSDP average gradients over the ranks, and this loss is a share of a global sum.
            (loss * world + coef * out.aux_loss / accum).backward()
        local_loss += loss.detach().float()
        local_aux += out.aux_loss.detach().float() / accum
    loss = distributed.all_sum_tensor(local_loss).item()
    aux_loss = distributed.all_sum_tensor(local_aux).item() / world
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
        grad_norm = grad_norm.full_tensor()
    return loss, aux_loss, grad_norm.item(), rewards


def _micro_batches(batch: list[int], m: int, world: int, rank: int) -> list[list[int]]:
    """This rank's micro-batches of a global batch (sorted by length): contiguous runs of m rows, dealt out."""
    runs = [batch[i:i + m] for i in range(0, len(batch), m)]
    return runs[rank::world]
