"""Every GPU figure minalign claims, measured by one command on one CUDA device (≤ 8 minutes on an H100/H200):

    python bench/gpu.py                          # writes runs/gpu.json and runs/gpu.md (the docs/benchmarks.md tables)
    python bench/gpu.py --parts kernels logprob  # some parts only
    python bench/gpu.py --smoke                  # every part at toy sizes on the CPU (kernels under TRITON_INTERPRET=1)

parts:
  kernels   the fused kernel natively against an fp64 reference at real, odd sizes (T 4096, H 4096, V 32000 and
            32768 + 3; bf16 and fp32; forward and both gradients): its error next to torch's own at that precision
  logprob   Mistral's head (H 4096, V 32000, bf16; T 1k/4k/16k), forward + backward: time, peak extra memory and
            TFLOP/s (6·T·V·H) of naive, torch.compile, chunked, the fused kernel, and Liger-Kernel's fused linear
            cross-entropy and Cut Cross-Entropy when installed (both give the per-token loss −log p with
            reduction="none"; `pip install liger-kernel cut-cross-entropy`, never minalign dependencies)
  decode    the sampler's decode tokens/s at batch 1 on a Mistral-7B-shaped random bf16 model with fewer layers (8 of
            32: the per-layer cost is the same, so tokens/s × 8/32 is the 7B figure), against the roofline of the
            measured HBM bandwidth (every weight read once per token), with and without torch.compile; and at
            batch 64
  train     one SFT and one DPO step (bf16 autocast over fp32 weights, as train.py) of a ~1B config: tokens/s and MFU
            against the device's dense bf16 peak (6·N·tokens, N the parameters in matmuls)
--smoke runs each part at toy sizes on the CPU so that the script cannot rot before a GPU arrives (CI runs it); its
figures mean nothing. Liger and CCE are skipped where they are not installed (always on the CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if "--smoke" in sys.argv:  # the kernel runs under triton's CPU interpreter: set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import minalign  # noqa: E402
from bench_logprob import best_time, inputs, naive, peak_memory  # noqa: E402
from kernels import token_logprobs_reference, token_logprobs_torch  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "A10": 125.0, "4090": 165.0}  # dense (no sparsity) bf16 tensor-core peaks, by device name

FULL = {"kernels": dict(T=4096, H=4096, V=(32000, 32768 + 3)),
        "logprob": dict(T=(1024, 4096, 16384), H=4096, V=32000),
        "decode": dict(layers=8, of=32, new_tokens=64, batch=(1, 64)),
        "train": dict(hidden=2048, intermediate=5632, layers=20, heads=16, kv=4, batch=4, seq=2048)}
SMOKE = {"kernels": dict(T=40, H=48, V=(200, 128 + 3)),
         "logprob": dict(T=(64,), H=64, V=500),
         "decode": dict(layers=2, of=2, new_tokens=4, batch=(1, 4)),
         "train": dict(hidden=64, intermediate=128, layers=2, heads=4, kv=2, batch=2, seq=32)}


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA), so a timer reads the work's time."""
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ kernels

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-3}  # tests/test_kernels.py's criterion (Cut Cross-Entropy's)
ULP = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8}  # a bf16 gradient's last rounding: up to half an ulp each way


def kernels_part(s: dict, device: str) -> list[dict]:
    """Max |error| against fp64 of the fused kernel and of torch's own at that precision (naive, full logits), for
    the log-probs and both gradients; "ok" when the kernel's is at most torch's + tol (tests/test_kernels.py's
    rule: TOL, plus one bf16 ulp of the largest value)."""
    from kernels import logprob
    rows = []
    for V in s["V"]:
        for dtype in (torch.float32, torch.bfloat16):
            hidden, weight, targets = inputs(s["T"], s["H"], V, dtype, device)
            upstream = torch.randn(s["T"], device=device, dtype=torch.float32,
                                   generator=torch.Generator(device=device).manual_seed(1))

            def grads(fn, h, w):
                h, w = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
                out = fn(h, w, targets)
                (out * upstream).sum().backward()
                return out.detach().double(), h.grad.double(), w.grad.double()
            want = grads(lambda h, w, t: token_logprobs_reference(h, w, t), hidden.double(), weight.double())
            ours = grads(logprob.token_logprobs, hidden, weight)
            torch_own = grads(naive, hidden, weight)
            for name, w, o, t in zip(("logprobs", "grad_hidden", "grad_weight"), want, ours, torch_own):
                err, ref = (o - w).abs().max().item(), (t - w).abs().max().item()
                tol = TOL[dtype] + ULP[dtype] * w.abs().max().item()
                rows.append({"V": V, "dtype": str(dtype).split(".")[1], "what": name, "kernel_error": err,
                             "torch_error": ref, "ok": err <= ref + tol})
            del hidden, weight, want, ours, torch_own
    return rows


# ------------------------------------------------------------------------------------------------ logprob

def providers(device: str) -> dict:
    """The per-token log-prob implementations to time: ours (the fused kernel under the interpreter in --smoke),
    and Liger's and CCE's where installed (on CUDA)."""
    from kernels import logprob
    out = {"naive": naive, "chunked": token_logprobs_torch, "fused": logprob.token_logprobs}
    if device == "cuda":
        out["compiled"] = torch.compile(naive, dynamic=False)  # one graph per T, not a dynamic-shape recompile
        try:  # Liger-Kernel: the per-token cross-entropy is −log p
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
            out["liger"] = lambda h, w, t: -liger_fused_linear_cross_entropy(h, w, t, reduction="none")
        except ImportError:
            pass
        try:  # Cut Cross-Entropy: its default skips negligible gradients ("filter_eps"); cce_exact does not
            from cut_cross_entropy import linear_cross_entropy
            out["cce"] = lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none")
            out["cce-exact"] = lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none", impl="cce_exact")
        except ImportError:
            pass
    return out


def logprob_part(s: dict, device: str, repeats: int) -> list[dict]:
    rows = []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for T in s["T"]:
        hidden, weight, targets = inputs(T, s["H"], s["V"], dtype, device)
        for name, fn in providers(device).items():
            try:
                seconds = best_time(fn, hidden, weight, targets, True, device, repeats)
                peak = peak_memory(fn, hidden, weight, targets, True, device)
            except Exception as e:  # an OOM at 16k, a third party's triton mismatch: the row says so, the run goes on
                rows.append({"T": T, "provider": name, "error": f"{type(e).__name__}: {str(e)[:120]}"})
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            rows.append({"T": T, "provider": name, "ms": seconds * 1e3, "peak_MB": peak / 2**20,
                         "TFLOPs": 6 * T * s["V"] * s["H"] / seconds / 1e12})
        del hidden, weight
    return rows


# ------------------------------------------------------------------------------------------------ decode

def bandwidth(device: str) -> float:
    """Measured device-memory bandwidth in bytes/s: a 1 GiB copy (256 MiB on the CPU) reads and writes it."""
    n = (2**30 if device == "cuda" else 2**28) // 2
    a, b = torch.empty(n, dtype=torch.bfloat16, device=device), torch.empty(n, dtype=torch.bfloat16, device=device)
    b.copy_(a)
    sync(device)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * a.element_size() / best


def decode_part(s: dict, device: str) -> list[dict]:
    """Decode tokens/s (prefill excluded: the time of max_new_tokens = 1 is taken off) at each batch size."""
    from minalign.sampling import generate
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=32000) if device == "cuda" else dict(hidden_size=64, intermediate_size=128,
                                                                 num_attention_heads=4, num_key_value_heads=2,
                                                                 vocab_size=256)
    cfg = minalign.get_config("tiny-mistral", num_hidden_layers=s["layers"], max_position_embeddings=4096,
                              sliding_window=None, **shape)  # (tiny-mistral's window is 16 tokens)
    model = minalign.Transformer(cfg).init_weights(std=0.02, seed=0).to(device=device, dtype=dtype).eval()
    # the bytes a decode step reads: every weight but the embedding table, of which it reads one row per token
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - \
        model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
    peak_bw = bandwidth(device)
    rows = []
    for compile_ in (False, True) if device == "cuda" else (False,):
        for batch in s["batch"]:
            prompts = [[1] + [5] * 31 for _ in range(batch)]

            def run(n):
                sync(device)
                t = time.perf_counter()
                generate(model, prompts, max_new_tokens=n, temperature=0.0, slots=batch, compile=compile_)
                sync(device)
                return time.perf_counter() - t
            run(s["new_tokens"])  # warm-up (and compile)
            seconds = min(run(s["new_tokens"]) for _ in range(2)) - min(run(1) for _ in range(2))
            tokens_per_s = batch * (s["new_tokens"] - 1) / seconds
            roofline = peak_bw / weight_bytes * batch  # every weight read once per step, the KV cache left out
            rows.append({"batch": batch, "compile": compile_, "tokens_per_s": tokens_per_s,
                         "roofline_tokens_per_s": roofline, "of_roofline": tokens_per_s / roofline,
                         "tokens_per_s_full_depth": tokens_per_s * s["layers"] / s["of"],
                         "bandwidth_GBps": peak_bw / 1e9, "weight_GB": weight_bytes / 1e9})
    return rows


# ------------------------------------------------------------------------------------------------ train

def train_part(s: dict, device: str, repeats: int, peak_tflops: float | None) -> list[dict]:
    """One SFT step and one DPO step (cached reference log-probs) of train.py's code: forward, loss, backward,
    clip, AdamW; tokens/s and MFU = 6·N·tokens / time / peak."""
    from minalign.logprobs import sequence_logprobs
    from minalign.losses import dpo_loss, sft_loss
    from minalign.train import TrainConfig, make_optimizer
    cfg = minalign.get_config("tiny-mistral", vocab_size=32000 if device == "cuda" else 256,
                              hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                              num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                              num_key_value_heads=s["kv"], max_position_embeddings=s["seq"], sliding_window=None)
    model = minalign.Transformer(cfg).init_weights(std=0.02, seed=0).to(device)
    n_matmul = model.num_parameters() - model.model.embed_tokens.weight.numel()
    optimizer = make_optimizer(model, TrainConfig())
    g = torch.Generator().manual_seed(0)
    half = s["seq"] // 2
    prompts = [torch.randint(3, cfg.vocab_size, (half,), generator=g).tolist() for _ in range(s["batch"])]
    responses = [torch.randint(3, cfg.vocab_size, (half,), generator=g).tolist() for _ in range(2 * s["batch"])]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step(mode):
        with autocast:
            if mode == "sft":
                out = sequence_logprobs(model, prompts, responses[:s["batch"]], batch_tokens=s["batch"] * s["seq"])
                loss = sft_loss(out.sums, int(out.counts.sum()))
            else:
                out = sequence_logprobs(model, prompts * 2, responses, batch_tokens=2 * s["batch"] * s["seq"])
                n = s["batch"]
                losses, _, _ = dpo_loss(out.sums[:n], out.sums[n:], out.sums[:n].detach() - 1,
                                        out.sums[n:].detach(), 0.1)
                loss = losses.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    rows = []
    for mode in ("sft", "dpo"):
        step(mode)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            step(mode)
            sync(device)
            best = min(best, time.perf_counter() - t)
        tokens = s["batch"] * s["seq"] * (1 if mode == "sft" else 2)
        achieved = 6 * n_matmul * tokens / best / 1e12
        rows.append({"mode": mode, "ms": best * 1e3, "tokens_per_s": tokens / best, "TFLOPs": achieved,
                     "MFU": achieved / peak if peak else None, "parameters_B": model.num_parameters() / 1e9})
    return rows


# ------------------------------------------------------------------------------------------------ the report

def markdown(results: dict) -> str:
    """The figures as the markdown tables docs/benchmarks.md takes."""
    lines = [f"Measured by `python bench/gpu.py` on {results['device']} (torch {results['torch']}).", ""]
    for part, rows in results["parts"].items():
        if not rows:
            continue
        keys = list(dict.fromkeys(k for r in rows for k in r))
        lines += [f"**{part}**", "", "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
        lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def versions() -> dict:
    """The versions of what was measured beside minalign (Liger's reduction="none" backward changed in 0.8.2)."""
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in ("triton", "liger-kernel", "cut-cross-entropy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def write(results: dict, out: Path) -> None:
    """The JSON (atomically) and the markdown tables beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        json.dump(results, f, indent=1)
    os.replace(f.name, out)
    out.with_suffix(".md").write_text(markdown(results) + "\n")


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return "" if v is None else str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (CI)")
    ap.add_argument("--parts", nargs="+", default=["kernels", "logprob", "decode", "train"],
                    choices=["kernels", "logprob", "decode", "train"])
    ap.add_argument("--out", default=str(ROOT / "runs" / "gpu.json"), help="the JSON of every figure (and .md beside)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not known")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device; --smoke runs every part at toy sizes on the CPU", file=sys.stderr)
        return 2
    device, sizes = ("cpu", SMOKE) if args.smoke else ("cuda", FULL)
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (--smoke: toy sizes)",
               "torch": torch.__version__, "versions": versions(), "parts": {}}
    began = time.perf_counter()
    for part in args.parts:
        t = time.perf_counter()
        if part == "kernels":
            rows = kernels_part(sizes[part], device)
        elif part == "logprob":
            rows = logprob_part(sizes[part], device, args.repeats)
        elif part == "decode":
            rows = decode_part(sizes[part], device)
        else:
            rows = train_part(sizes[part], device, args.repeats, args.peak_tflops)
        results["parts"][part] = rows
        results["seconds"] = time.perf_counter() - began
        write(results, Path(args.out))  # after every part: a later failure loses nothing measured
        print(f"bench/gpu.py: {part}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
        if device == "cuda":
            torch.cuda.empty_cache()
    print(markdown(results))
    bad = [r for r in results["parts"].get("kernels", []) if not r["ok"]]
    if bad:
        print(f"bench/gpu.py: the kernel's error exceeds torch's own: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
