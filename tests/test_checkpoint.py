"""HF checkpoint dirs: sharded round trips, one-copy loading, and a clear error for each kind of bad input."""
import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import minalign
from minalign.checkpoint import INDEX_FILE, CheckpointError, all_finite, check_checkpoint
from minalign.config import get_config
from minalign.model import Transformer
from tests.test_data import mode, umask_set
from tests.tiny import hf_tiny_checkpoint


def tiny(kind="mixtral", seed=0):
    return Transformer(get_config(f"tiny-{kind}")).init_weights(seed=seed)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs after the round trip"


def test_sharded_round_trip(tmp_path):
    model = tiny()
    limit = 60_000
    out = minalign.save_model(model, tmp_path / "ck", max_shard_size=limit)
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(model.state_dict())
    total = 0
    for name in shards:
        with safe_open(out / name, "pt") as f:
            assert f.metadata() == {"format": "pt"}  # transformers refuses safetensors without it
            sizes = [f.get_tensor(k).numel() * 4 for k in f.keys()]
        total += sum(sizes)
        assert sum(sizes) <= limit or len(sizes) == 1, f"{name} holds {sum(sizes)} bytes > {limit}"
    assert index["metadata"]["total_size"] == total
    assert_same_weights(minalign.load_model(out), model)
    # a bf16 load converts while loading
    assert all(p.dtype == torch.bfloat16 for p in minalign.load_model(out, dtype=torch.bfloat16).parameters())


def test_resave_replaces_stale_shards_and_keeps_other_files(tmp_path):
    path = tmp_path / "ck"
    minalign.save_model(tiny(seed=0), path, max_shard_size=60_000)
    (path / "tokenizer.model").write_bytes(b"keep me")
    second = tiny(seed=1)
    minalign.save_model(second, path)  # now a single file: the shards and index must go
    names = sorted(os.listdir(path))
    assert names == ["config.json", "model.safetensors", "tokenizer.model"], names
    assert_same_weights(minalign.load_model(path), second)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ck.tmp")], "temp dir left behind"


def test_load_peak_memory_is_one_copy(tmp_path):
    """Peak RSS while loading a ~260 MB checkpoint stays near one copy of the weights (not two)."""
    cfg = get_config("tiny-mistral", vocab_size=32000, hidden_size=1024, intermediate_size=1024,
                     num_attention_heads=8, num_key_value_heads=2)
    model = Transformer(cfg)
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    minalign.save_model(model, tmp_path / "big", max_shard_size="100MB")
    del model
    script = textwrap.dedent(f"""
        import torch, minalign
        def status(field):  # kB -> bytes, from /proc/self/status
            return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
        with torch.device("meta"):  # first meta-device build imports torch's meta kernels (~150 MB, fixed)
            torch.nn.Embedding(2, 2)
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
        base = status("VmRSS")
        model = minalign.load_model({str(tmp_path / 'big')!r})
        touched = sum(float(p.detach().sum()) for p in model.parameters())  # fault in every page
        print(status("VmHWM") - base)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grown = int(out.stdout.strip().splitlines()[-1])
    assert grown < 1.3 * nbytes, f"loading {nbytes / 2**20:.0f} MB grew peak RSS by {grown / 2**20:.0f} MB"


def test_transformers_checkpoint_keys_load_exactly(tmp_path):
    """A transformers-written Mixtral uses the published per-expert keys; nothing missing or unexpected."""
    path, _ = hf_tiny_checkpoint(tmp_path, "mixtral")
    keys = set(load_file(path / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys
    assert "model.layers.1.block_sparse_moe.gate.weight" in keys
    assert keys == set(minalign.load_model(path).state_dict())


# --- bad input -------------------------------------------------------------------------------------------------

def test_missing_unexpected_and_misshaped_keys_listed_together(tmp_path):
    path = minalign.save_model(tiny("mistral"), tmp_path / "ck")
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    del weights["model.norm.weight"]
    weights["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    weights["lm_head.weight"] = torch.zeros(7, 64)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        minalign.load_model(path)
    msg = str(e.value)
    for needle in ("missing keys (2)", "model.layers.1.mlp.up_proj.weight", "model.norm.weight",
                   "unexpected keys (1)", "model.layers.0.self_attn.extra.weight",
                   "mis-shaped keys (1)", "lm_head.weight (7, 64) != expected (512, 64)"):
        assert needle in msg, f"{needle!r} not in:\n{msg}"
    assert "\n" not in msg  # the stages print it as their one line


def test_a_long_key_list_is_cut(tmp_path):
    path = minalign.save_model(tiny("mistral"), tmp_path / "ck")
    weights = load_file(path / "model.safetensors")
    save_file({**weights, **{f"extra.{i:02d}": torch.zeros(1) for i in range(25)}}, path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        minalign.load_model(path)
    message = str(e.value)
    assert "unexpected keys (25): extra.00, extra.01," in message and message.endswith("extra.09, and 15 more")


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        minalign.load_model(tmp_path / "nowhere")
    path = minalign.save_model(tiny("mistral"), tmp_path / "ck")
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        minalign.load_model(path)
    path = minalign.save_model(tiny("mistral"), tmp_path / "ck2")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found: expected model.safetensors"):
        minalign.load_model(path)


def test_broken_index(tmp_path):
    path = minalign.save_model(tiny(), tmp_path / "ck", max_shard_size=60_000)
    (path / "model-00002-of-" f"{len(list(path.glob('model-*'))):05d}.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shards that are missing: model-00002-of"):
        minalign.load_model(path)
    (path / INDEX_FILE).write_text("{oops")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        minalign.load_model(path)


def set_config(path, **changes) -> None:
    """Change keys of path/config.json; a value of ... removes the key."""
    config = {**json.loads((path / "config.json").read_text()), **changes}
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not ...}))


@pytest.mark.parametrize("corrupt, phrase", [
    (lambda p: (p / "model.safetensors").write_bytes(b""), "model.safetensors: not a valid safetensors file (0 bytes"),
    (lambda p: (p / "model.safetensors").write_bytes(b"\x10\x00"), "(2 bytes: shorter than the 8"),
    (lambda p: (p / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}"), "its header claims 18446744073709551615 "
                                                                          "bytes, but the file has 2 after"),
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-1]), "truncated"),
    (lambda p: save_file({**load_file(p / "model.safetensors"), "model.norm.weight": torch.ones(64).double()},
                         p / "model.safetensors"),
     "model.norm.weight is stored as F64; a checkpoint's weights are one of F32 (float32), F16 (float16), BF16"),
    (lambda p: set_config(p, num_hidden_layers=10**9), "config.json: num_hidden_layers is 1000000000, but the "
                                                        "weights hold 2 layers"),
    (lambda p: set_config(p, num_hidden_layers=1), "num_hidden_layers is 1, but the weights hold 2 layers"),
    (lambda p: set_config(p, model_type="mixtral", num_local_experts=2**31 - 1), "num_local_experts is 2147483647, "
                                                                               "but the weights hold 0 experts"),
    (lambda p: set_config(p, num_attention_heads=0), "config.json: num_attention_heads must be a positive integer"),
    (lambda p: set_config(p, vocab_size=2**40), "config.json: vocab_size must be a positive integer below 2**31"),
    (lambda p: set_config(p, rope_theta="1e4"), "config.json: rope_theta must be a positive finite number, got '1e4'"),
    (lambda p: set_config(p, num_key_value_heads=3), "num_attention_heads (4) must be a multiple of "
                                                    "num_key_value_heads (3)"),
    (lambda p: (p / "config.json").write_text("[" * 100_000), "config.json: not valid JSON"),
])
def test_bad_checkpoint_files_name_the_file_and_key(tmp_path, corrupt, phrase):
    """Found from config.json and the headers before any model is built: at once, even for 1e9 layers."""
    path = minalign.save_model(tiny("mistral"), tmp_path / "ck")
    corrupt(path)
    for check in (check_checkpoint, minalign.load_model):
        start = time.perf_counter()
        with pytest.raises(CheckpointError) as e:
            check(path)
        assert phrase in str(e.value) and str(path) in str(e.value), str(e.value)
        assert time.perf_counter() - start < 2 and "\n" not in str(e.value)


def test_broken_index_entries(tmp_path):
    path = minalign.save_model(tiny(), tmp_path / "ck", max_shard_size=60_000)
    index = json.loads((path / INDEX_FILE).read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    for weight_map, phrase in [(["a"], "it needs a weight_map object of tensor name -> shard file, got ['a']"),
                               ({"k": 5}, "weight_map['k'] must be the name of a shard file in"),
                               ({"k": "../ck/" + first}, "weight_map['k'] must be the name of a shard file"),
                               ({"k": "/etc/passwd"}, "must be the name of a shard file")]:
        (path / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CheckpointError, match="not a valid safetensors index|must be the name") as e:
            minalign.load_model(path)
        assert phrase in str(e.value) and INDEX_FILE in str(e.value), str(e.value)
    # a tensor in two shards: which one would win is a guess
    key = next(iter(load_file(path / second)))
    save_file({**load_file(path / first), key: load_file(path / second)[key]}, path / first)
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{second}: holds {key}, which {first} holds too"):
        minalign.load_model(path)


def test_check_finite_names_the_weight(tmp_path):
    path = minalign.save_model(tiny("mistral"), tmp_path / "ck")
    weights = load_file(path / "model.safetensors")
    for bad in (math.nan, math.inf, -math.inf):
        save_file({**weights, "model.layers.1.mlp.up_proj.weight": weights["model.layers.1.mlp.up_proj.weight"]
                   .index_fill(0, torch.tensor([3]), bad)}, path / "model.safetensors")
        minalign.load_model(path)  # unchecked: loads
        with pytest.raises(CheckpointError, match=r"model.safetensors: model.layers.1.mlp.up_proj.weight holds NaN or "
                                                  r"infinite values$"):
            minalign.load_model(path, check_finite=True)
    # finite as stored, infinite where it will be used
    save_file({**weights, "model.norm.weight": torch.full((64,), 1e5)}, path / "model.safetensors")
    minalign.load_model(path, check_finite=True)
    with pytest.raises(CheckpointError, match="model.norm.weight holds NaN or infinite values once cast to float16"):
        minalign.load_model(path, dtype=torch.float16, check_finite=True)


def test_all_finite_is_exact():
    big = torch.full((8,), 60000.0, dtype=torch.float16)  # every value finite, the float16 sum is not
    assert all_finite(big) and all_finite(torch.zeros(0)) and all_finite(torch.full((3,), 3e38))
    for bad in (math.nan, math.inf, -math.inf):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            t = torch.zeros(100, dtype=dtype)
            t[57] = bad
            assert not all_finite(t) and not all_finite(big.index_fill(0, torch.tensor([2]), bad))


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_saved_checkpoint_has_the_umask_permissions(tmp_path, mask):
    """Directories 0o777 and files 0o666, less the umask, the parents save_model creates included."""
    with umask_set(mask):
        path = minalign.save_model(tiny("mistral"), tmp_path / "runs" / "ck")
        minalign.save_model(tiny("mistral"), tmp_path / "sharded", max_shard_size=60_000)
    for d in (tmp_path / "runs", path, tmp_path / "sharded"):
        assert mode(d) == 0o777 & ~mask, (d, oct(mode(d)))
    for f in [*path.iterdir(), *(tmp_path / "sharded").iterdir()]:
        assert mode(f) == 0o666 & ~mask, (f, oct(mode(f)))


class _Bomb:
    """Unpickling this writes a marker file: proof that a loader unpickled what it was given."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "consolidated.00.pt"])
def test_pickled_weights_refused_never_unpickled(tmp_path, name):
    path = minalign.save_model(tiny("mistral"), tmp_path / "ck")
    (path / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (path / name).write_bytes(pickle.dumps(_Bomb(str(marker))))
    with pytest.raises(CheckpointError, match=f"only pickled weights.*{name}.*convert them to safetensors"):
        minalign.load_model(path)
    assert not marker.exists(), "the pickle was executed"
