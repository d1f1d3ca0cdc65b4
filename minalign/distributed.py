"""torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), nanoGPT style.

Under plain `python` there is no process group: a world of one, rank 0, and every helper is a no-op.
A CLI ends with `distributed.exit(status)`.
"""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist


def init(device: str | None = None) -> tuple[int, int, torch.device]:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU); return (rank, world_size, device).

    device: "cpu" or "cuda" (None: cuda if available). Under torchrun, CUDA means cuda:LOCAL_RANK.
    """
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(kind)
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    dev = torch.device(kind, local_rank) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(dev)
    # Ranks finish their shards at different times and then wait for each other; the default timeout
    # (10-30 min) could fire in that wait on a long run.
    dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=datetime.timedelta(hours=6),
                            device_id=dev if kind == "cuda" else None)
    return rank, world, dev


SMALL_MODEL = 100_000_000  # parameters; below this a CPU op is too small to share out over threads


def fit_threads(model: torch.nn.Module) -> torch.nn.Module:
    """On the CPU, one intra-op thread for a model under SMALL_MODEL parameters; returns the model.

    Such a model's matmuls are too small to split, and torch's threads spin-wait for each other: on 2 cores beside
    one other busy process a 200-step SFT of the demo's model took 24-49 s with 2 threads and 6.6 s with one.
    Left alone where the user chose (OMP_NUM_THREADS set, as torchrun also does) or the model is on a GPU.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return model
    first = next(model.parameters(), None)
    if first is not None and first.device.type in ("cpu", "meta") and sum(p.numel() for p in model.parameters()) < SMALL_MODEL:
        torch.set_num_threads(1)
    return model


def is_main() -> bool:
    """Whether this process is rank 0 (or the only process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait until every rank gets here."""
    if dist.is_initialized():
        dist.barrier()


def all_sum(values: list[int]) -> list[int]:
    """Element-wise sum of integer counts over all ranks (the counts themselves in a world of one)."""
    if not dist.is_initialized():
        return list(values)
    return all_sum_tensor(torch.tensor(values, dtype=torch.long)).tolist()


def all_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of t over all ranks (t itself in a world of one), on t's device; t is not changed."""
    if not dist.is_initialized():
        return t
    out = t.detach().to("cuda" if dist.get_backend() == "nccl" else "cpu", copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard a Transformer's weights over all ranks with FSDP2 (`fully_shard`), for a model too big for one
    device: each rank keeps 1/world of every weight; a forward all-gathers one decoder layer at a time and
    frees it again after use.

    torchtitan's order: each decoder layer is its own unit, then the root takes what is left (embeddings, final
    norm, lm_head). The root is not resharded after a forward, so `model.lm_head.weight` stays whole for the
    log-prob head that runs after the forward (the log-prob kernel takes the weight, not the module).
    The weights may sit on the CPU (a memory-mapped checkpoint): each fully_shard call copies one layer's weights
    to the device and keeps this rank's shard of them, so the whole model never is on one device.
    Every forward is then a collective: all ranks must call it the same number of times.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


def exit(code: int):
    """End the process with this status.

    Under torchrun the process group is not torn down: gloo's threads can abort the teardown ("terminate called
    without an active exception", after all work is done and written), which torchrun reports as a failed
    run. Every file is closed by now, so flush stdio and leave at once with os._exit.
    """
    if dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
