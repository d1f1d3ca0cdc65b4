"""HF-layout checkpoint directories in and out: config.json + model.safetensors, or shards + index.

Loading builds the model on the meta device (no memory) and assigns the memory-mapped safetensors tensors
straight into it, so a checkpoint costs one copy of its weights in memory, not two. Before anything is built,
config.json is checked against the weights' headers (check_checkpoint: cheap, and what a stage calls first).
Pickled weights are refused: unpickling runs arbitrary code from the file.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minalign.config import ModelConfig, from_hf_config, to_hf_config
from minalign.errors import CheckpointError
from minalign.data import file_mode, read_json_object, short_repr
from minalign.model import Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# What a checkpoint's weights may be stored as (safetensors' names): an int8 or bool tensor would be cast silently.
WEIGHT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")
EXPERT_KEY = re.compile(r"model\.layers\.\d+\.block_sparse_moe\.experts\.(\d+)\.")
LISTED = 10  # keys named per kind in a mismatch message; the rest are counted


class StoredTensor(NamedTuple):
    """A tensor of a checkpoint as its file's header describes it (nothing read yet)."""

    file: Path
    handle: object  # the file's safe_open handle (memory-mapped)
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, I8, BOOL, ...


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint dir, from its index when sharded; clear errors otherwise."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = read_json_object(index).get("weight_map")
        except ValueError as e:  # names the index: not UTF-8, not JSON, not an object
            raise CheckpointError(f"{e}: not a valid safetensors index") from None
        except OSError as e:
            raise CheckpointError(f"{index}: cannot be read ({e.strerror})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: not a valid safetensors index (it needs a weight_map object of tensor "
                                  f"name -> shard file, got {short_repr(weight_map)})")
        for key, name in weight_map.items():  # a shard is a file beside the index, never elsewhere
            if not (isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name):
                raise CheckpointError(f"{index}: weight_map[{key!r}] must be the name of a shard file in {path}, "
                                      f"got {short_repr(name)}")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(absent)}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointError(
            f"{path}: found only pickled weights ({', '.join(pickled)}). minalign never unpickles files "
            f"(unpickling can run arbitrary code); convert them to safetensors first, e.g. with transformers: "
            f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise CheckpointError(f"{path}: no weights found: expected {SINGLE_FILE} or {INDEX_FILE}")


def _why_invalid(file: Path, error: SafetensorError) -> str:
    """What is wrong with a file safetensors refused: in numbers when its header's length does not fit the file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little") if size >= 8 else None
    if length is None:
        return f"{size} bytes: shorter than the 8 that give the header's length"
    if 8 + length > size:
        return f"its header claims {length} bytes, but the file has {size - 8} after the 8 that say so"
    return str(error).removeprefix("Error while deserializing header: ")


def open_weights(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of checkpoint dir `path` by key, from the files' headers (no weight is read).

    safetensors checks each header against its file (a truncated or empty file, a header longer than the file,
    offsets past its end): CheckpointError naming the file, as for a key stored in two files.
    """
    found: dict[str, StoredTensor] = {}
    for file in weight_files(path):
        try:
            handle = safe_open(file, framework="pt", device="cpu")
            tensors = [(key, handle.get_slice(key)) for key in handle.keys()]
        except SafetensorError as e:
            raise CheckpointError(f"{file}: not a valid safetensors file ({_why_invalid(file, e)}); truncated or "
                                  f"corrupt?") from None
        except OSError as e:
            raise CheckpointError(f"{file}: cannot be read ({e.strerror or e})") from None
        for key, view in tensors:
            if key in found:
                raise CheckpointError(f"{file}: holds {key}, which {found[key].file.name} holds too")
            found[key] = StoredTensor(file, handle, tuple(view.get_shape()), view.get_dtype())
    return found


def check_dtypes(found: dict[str, StoredTensor], keys) -> None:
    """CheckpointError naming the file and the first of keys stored as anything but WEIGHT_DTYPES."""
    for key in sorted(keys & found.keys()):
        if found[key].dtype not in WEIGHT_DTYPES:
            kinds = ", ".join(f"{name} ({str(dtype).removeprefix('torch.')})" for name, dtype in WEIGHT_DTYPES.items())
            raise CheckpointError(f"{found[key].file}: {key} is stored as {found[key].dtype}; a checkpoint's "
                                  f"weights are one of {kinds}")


def require_dir(path, name: str) -> Path:
    """path as a Path; CheckpointError naming the flag or key `name` if it is not a directory (missing, or a file)."""
    path = Path(path)
    if not path.is_dir():
        what = "not a directory" if path.exists() else "no such directory"
        raise CheckpointError(f"{name} {path}: {what} (expected an HF checkpoint dir: config.json, weights and "
                              f"tokenizer files)")
    return path


def check_checkpoint(path: str | os.PathLike) -> ModelConfig:
    """The config of an HF Mistral/Mixtral checkpoint dir, checked against its weights' headers (cheap: no weight
    is read, no model built); CheckpointError naming the file, key or config key at fault.

    The numbers of layers and of experts are compared before anything is built from the config: they set how
    many modules the model has, so a config.json saying 1e9 layers must not get as far as building them.
    """
    return _checked(path)[0]


def _checked(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, StoredTensor]]:
    """check_checkpoint's config, and the headers it read (for load_model, so they are read once)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected an HF checkpoint dir with config.json)")
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{path}: config.json is missing")
    try:
        cfg = from_hf_config(config)
    except ValueError as e:  # the message names config.json and the key
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"{config}: cannot be read ({e.strerror})") from None
    found = open_weights(path)
    check_dtypes(found, found.keys())
    keys = found.keys()  # the modules to build are counted from these, not from the config
    layers = {m[1] for m in map(LAYER_KEY.match, keys) if m}
    if cfg.num_hidden_layers != len(layers):
        raise CheckpointError(f"{config}: num_hidden_layers is {cfg.num_hidden_layers}, but the weights hold "
                              f"{len(layers)} layers")
    experts = {m[1] for m in map(EXPERT_KEY.match, keys) if m}
    if cfg.is_moe and cfg.num_local_experts != len(experts):
        raise CheckpointError(f"{config}: num_local_experts is {cfg.num_local_experts}, but the weights hold "
                              f"{len(experts)} experts per layer")
    return cfg, found


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               check_finite: bool = False) -> Transformer:
    """Load an HF Mistral/Mixtral checkpoint dir; dtype None keeps the stored dtype.

    check_finite: refuse a weight holding NaN or infinity (one more pass over the weights; see load_weights).
    """
    cfg, found = _checked(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    what = f"the {cfg.num_hidden_layers}-layer {'mixtral' if cfg.is_moe else 'mistral'} model in its config.json"
    return load_weights(model, Path(path), what, dtype, device, check_finite, found)


def _listed(keys: list[str]) -> str:
    """Up to LISTED keys, comma-separated, and how many more there are."""
    more = f", and {len(keys) - LISTED} more" if len(keys) > LISTED else ""
    return ", ".join(keys[:LISTED]) + more


def all_finite(t: torch.Tensor) -> bool:
    """Whether t holds no NaN and no infinity, in about the time of one read of it.

    Its sum is finite then, and NaN or infinite whenever t is not; a float16 sum can also overflow (past 65504)
    with every value finite, so a sum that is not finite is checked exactly, 16M values at a time.
    """
    if math.isfinite(t.sum()):
        return True
    return all(bool(torch.isfinite(chunk).all()) for chunk in t.reshape(-1).split(1 << 24))


def load_weights(model: torch.nn.Module, path: Path, what: str, dtype: torch.dtype | None, device,
                 check_finite: bool = False, found: dict[str, StoredTensor] | None = None) -> torch.nn.Module:
    """Assign the safetensors weights of checkpoint dir `path` to a meta-device `model` (memory-mapped: one copy).

    Every header is read first, so one CheckpointError (one line) lists all missing, unexpected and mis-shaped
    keys together (`what` describes the model they were meant for); a weight stored as anything but a float
    (WEIGHT_DTYPES) is refused naming it. check_finite: also refuse a weight holding NaN or infinity, which
    would otherwise surface only in the results. found: open_weights(path), when the caller has read it.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = found if found is not None else open_weights(path)  # found: the headers, when already read
    check_dtypes(found, expected.keys())
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    misshaped = [f"{k} {found[k].shape} != expected {expected[k]}" for k in expected
                 if k in found and found[k].shape != expected[k]]
    if missing or unexpected or misshaped:
        parts = [f"{title} ({len(keys)}): {_listed(keys)}" for title, keys in (
            ("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)) if keys]
        raise CheckpointError(f"{path}: checkpoint does not match {what}: " + "; ".join(parts))

    state = {}
    for key in expected:
        t = found[key].handle.get_tensor(key)  # a view of the memory-mapped file: no copy yet
        state[key] = t.to(device=device, dtype=dtype or t.dtype)  # copies only when dtype/device change
        # Checked where it will be used: on the GPU it is fast, and a float32 weight past 65504 cast to float16
        # shows up as the infinity it becomes.
        if check_finite and not all_finite(state[key]):
            cast = f" once cast to {str(dtype).removeprefix('torch.')}" if dtype not in (None, t.dtype) else ""
            raise CheckpointError(f"{found[key].file}: {key} holds NaN or infinite values{cast}")
    model.load_state_dict(state, assign=True, strict=True)
    return model


def _parse_size(size: int | str) -> int:
    """Bytes from 5_000_000_000, '5GB' (decimal, as HF counts) or '4GiB' (binary)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r} (e.g. '5GB', '500MB', '4GiB')")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0])
    return int(float(m.group(1)) * base ** power)


def save_model(model: Transformer, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> Path:
    """Write model as an HF checkpoint dir (config.json + model.safetensors, or shards + index).

    Everything is written to a temp dir beside `path` first, then moved in file by file (each an atomic
    rename), so a kill mid-save never leaves a half-written file, and the index and config arrive last.
    Weight files of an earlier save that the new one does not use are removed; other files (tokenizer) stay.
    """
    path = Path(path)
    limit = _parse_size(max_shard_size)
    state = model.state_dict()
    dtypes = {t.dtype for t in state.values()}
    dtype = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32"

    shards: list[list[str]] = [[]]
    size = 0
    for key, t in state.items():  # keep checkpoint order; start a new shard when this tensor would overflow
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        for name, keys in zip(names, shards):
            # One shard at a time on the CPU, so saving a GPU model never holds a second full copy.
            tensors = {k: state[k].detach().to("cpu").contiguous() for k in keys}
            save_file(tensors, tmp / name, metadata={"format": "pt"})
            os.chmod(tmp / name, file_mode())  # safetensors creates it 0600, whatever the umask
        if n > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(to_hf_config(model.config, dtype), indent=2) + "\n")

        path.mkdir(exist_ok=True)
        stale = {p.name for p in path.iterdir() if p.name.startswith("model") and p.suffix in (".safetensors", ".json")}
        for name in names + ([INDEX_FILE] if n > 1 else []) + ["config.json"]:
            os.replace(tmp / name, path / name)
        for name in stale - set(names) - ({INDEX_FILE} if n > 1 else set()):
            (path / name).unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
