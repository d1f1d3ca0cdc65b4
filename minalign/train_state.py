"""A training run's state on disk, in train.out: checkpoints/step_N (an HF model dir, loadable as is, plus AdamW's
state as safetensors and JSON: no pickle, so loading one runs no code), latest.json (the newest complete one),
trainer_state.json (the settings a resume must repeat), metrics.jsonl (rewound to the checkpoint on a resume), and
final/ (the finished model with its tokenizer). Every file appears whole: temp dirs renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

import minalign
from minalign import distributed
from minalign.checkpoint import save_model
from minalign.data import atomic_write, file_mode, read_jsonl
from minalign.errors import RunError
from minalign.model import Transformer
from minalign.runs import changed_settings, cut_torn_line


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
            cpu_model = Transformer(getattr(model, "module", model).config)  # DDP keeps it as .module
        cpu_model.load_state_dict(weights, assign=True, strict=True)
        save_model(cpu_model, tmp)
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


def run_settings(cfg, world: int) -> dict:
    """What a resume must share with the run it continues (the rest — logging, saving, parallelism — may change).
    train.steps stays: the warmup and cosine are laid over it, so more steps would make the learning rate rise
    again in the middle of a run."""
    c = cfg.to_dict()
    for k in ("log_every", "save_every", "keep_checkpoints", "stop_after", "resume", "micro_batch_size",
              "parallel", "activation_checkpointing", "device"):
        c["train"].pop(k)
    return c


def resume_point(run: Path, settings: dict) -> tuple[Path | None, int]:
    """(the checkpoint to resume from, its step), or (None, 0) for a new run; a RunError when the checkpoint was
    written with other settings (runs.changed_settings names them)."""
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        return None, 0
    prev = json.loads((ckpt / "trainer_state.json").read_text())
    if prev["settings"] != settings:
        diffs = ["the data file" if k == "data_sha256" else k for k in changed_settings(prev["settings"], settings)]
        start_from = run / "final" if (run / "final").is_dir() else ckpt  # either is an HF model dir
        why = (f" (train.steps {prev['settings']['train'].get('steps')} then: the learning-rate schedule is laid over "
               f"it; to train on, start a new run from {start_from} with --model.path)"
               if "train.steps" in diffs else "")
        raise RunError(f"{ckpt} was written with other settings ({', '.join(diffs)}); resume with the same "
                       f"ones{why}")
    return ckpt, prev["step"]


def rewind_metrics(run: Path, ckpt: Path | None, start: int) -> None:
    """metrics.jsonl as of the checkpoint resumed (rank 0): records of later steps were lost with the run that
    made them; a run killed before its first checkpoint starts the file over."""
    metrics = run / "metrics.jsonl"
    if metrics.is_file() and ckpt is None:
        metrics.unlink()
    elif metrics.is_file():
        cut_torn_line(metrics)  # a record torn by a full disk or a power loss, as the partial files get
        kept = [json.dumps(r) + "\n" for _, r in read_jsonl(metrics) if r.get("step", 0) <= start]
        atomic_write(metrics, "".join(kept))
    if ckpt is not None:
        print(f"train.py: resuming from {ckpt} at step {start}", file=sys.stderr)


def write_final(run: Path, tokenizer) -> Path:
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
