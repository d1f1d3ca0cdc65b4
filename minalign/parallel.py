"""How a model runs on torchrun's ranks, applied from outside the model in torchtitan's order: activation
checkpointing, then DDP (replicated weights) or FSDP2 (each weight sharded over the ranks, one decoder layer
gathered at a time), and gradient accumulation without a sync on every micro-batch.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from minalign.model import Transformer


def shard_model(model: torch.nn.Module, device: torch.device, mixed_precision: bool = False) -> torch.nn.Module:
    """Shard a Transformer's weights over all ranks with FSDP2 (`fully_shard`), for a model too big for one
    device: each rank keeps 1/world of every weight; a forward all-gathers one decoder layer at a time and
    frees it again after use.

    torchtitan's order: each decoder layer is its own unit, then the root takes what is left (embeddings, final
    norm, lm_head). The root is not resharded after a forward, so `model.lm_head.weight` stays whole for the
    log-prob head that runs after the forward (the log-prob kernel takes the weight, not the module).
    The weights may sit on the CPU (a memory-mapped checkpoint): each fully_shard call copies one layer's weights
    to the device and keeps this rank's shard of them, so the whole model never is on one device.
    Every forward is then a collective: all ranks must call it the same number of times.

    mixed_precision (training, as torchtitan): FSDP2's MixedPrecisionPolicy, the fp32 shards all-gathered as bf16
    and computed in bf16, gradients reduced in fp32 into the fp32 shards. Autocast over fp32 weights would gather
    fp32, twice the bytes of every all-gather (a 7B policy: 28 GB a forward, and again in backward, instead of 14).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else \
        MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    return model


def checkpoint_layers(model: Transformer) -> None:
    """Activation checkpointing, applied from outside the model: each decoder layer's forward becomes a
    torch.utils.checkpoint call of itself, so its activations are recomputed in backward instead of kept.
    Parameter names (and so the checkpoint keys) do not change."""
    for layer in model.model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def wrap_model(model: Transformer, parallel: str, activation_checkpointing: bool, world: int, device: torch.device,
               mixed_precision: bool = False):
    """The model as trained on this rank: activation checkpointing, then DDP or FSDP2 (parallel "ddp" or "fsdp";
    torchtitan's order); mixed_precision: FSDP2's bf16 policy (shard_model), where the others autocast."""
    if activation_checkpointing:
        checkpoint_layers(model)
    if world == 1:
        return model.to(device)
    if parallel == "fsdp":
        return shard_model(model, device, mixed_precision)
    return torch.nn.parallel.DistributedDataParallel(model.to(device),
                                                     device_ids=[device.index] if device.type == "cuda" else None)


def core_module(model) -> Transformer:
    """The Transformer inside a DDP wrapper (FSDP2 shards the module in place)."""
    return getattr(model, "module", model)


def no_sync(model):
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
