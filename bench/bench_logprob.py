"""Per-token log-probs of given targets, four ways: time and peak extra memory, forward and forward+backward.

    python bench/bench_logprob.py                        # CPU, a scaled-down head (H=512, V=32000)
    python bench/bench_logprob.py --device cuda          # Mistral's head (H=4096, V=32000), bf16, T=1k/4k/16k

providers:
  naive     log_softmax(h @ W.T).gather(targets)                     full [T, V] logits (and their gradient)
  compiled  torch.compile of naive
  chunked   minalign's torch path, lse saved                          [131, V] fp32 at a time (16 MB)
  fused     minalign's Triton kernel (CUDA only)                     O(T): out and lse
"Extra memory" is the peak above what the inputs already hold (CUDA: max_memory_allocated; CPU: peak RSS).
"""
import argparse
import os
import subprocess
import sys
import time

import torch

from kernels import token_logprobs_torch


def naive(hidden, weight, targets):
    return (hidden @ weight.T).float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def _rss(field):
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1]) * 1024


class PeakMemory:
    """Peak bytes allocated above the level at entry (CUDA allocator, or the process's peak RSS on CPU)."""

    def __init__(self, device):
        self.cuda = device == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
            self.base = _rss("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _rss("VmHWM") - self.base


def run_once(fn, hidden, weight, targets, backward):
    h = hidden.detach().requires_grad_(backward)
    w = weight.detach().requires_grad_(backward)
    out = fn(h, w, targets)
    if backward:
        out.sum().backward()
    return out


def best_time(fn, hidden, weight, targets, backward, device, repeats):
    run_once(fn, hidden, weight, targets, backward)  # warm-up (and compile)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        run_once(fn, hidden, weight, targets, backward)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def peak_memory(fn, hidden, weight, targets, backward, device):
    run_once(fn, hidden, weight, targets, backward)  # warm-up (and compile)
    with PeakMemory(device) as mem:
        run_once(fn, hidden, weight, targets, backward)
    return mem.peak


def inputs(T, H, V, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(T, H, device=device, dtype=dtype, generator=g)
    weight = torch.randn(V, H, device=device, dtype=dtype, generator=g) * H ** -0.5
    targets = torch.randint(0, V, (T,), device=device, generator=g)
    return hidden, weight, targets


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="T values (default: cpu 1k 4k, cuda 1k 4k 16k)")
    ap.add_argument("--hidden", type=int, default=None, help="H (default: cpu 512, cuda 4096)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default=None, help="default: cpu float32, cuda bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-of", nargs=3, metavar=("PROVIDER", "T", "PASS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    tokens = args.tokens or ([1024, 4096, 16384] if cuda else [1024, 4096])
    H = args.hidden or (4096 if cuda else 512)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    providers = {"naive": naive, "compiled": torch.compile(naive), "chunked": token_logprobs_torch}
    if cuda:
        from kernels.logprob import token_logprobs
        providers["fused"] = token_logprobs

    if args.memory_of:  # child process of a CPU run: one peak-memory figure, printed for the parent
        name, T, which = args.memory_of
        print(peak_memory(providers[name], *inputs(int(T), H, args.vocab, dtype, "cpu"), which == "fwd+bwd", "cpu"))
        return

    def memory(name, T, backward):
        if cuda:
            return peak_memory(providers[name], *inputs(T, H, args.vocab, dtype, "cuda"), backward, "cuda")
        # CPU peak RSS, in a fresh process: glibc would otherwise hand freed blocks out again unseen, so a
        # fixed mmap threshold makes every large tensor its own mapping, returned on free. (Timings are taken
        # here, with the normal allocator: fresh mappings cost page faults.)
        cmd = [sys.executable, *sys.argv, "--memory-of", name, str(T), "fwd+bwd" if backward else "fwd"]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        return int(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.split()[-1])

    print(f"{args.device} {torch.cuda.get_device_name() if cuda else ''} H={H} V={args.vocab} {dtype}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'T':>6} {'pass':>8} {'provider':>9} {'ms':>9} {'extra MB':>9} {'vs naive: speed':>16} {'memory':>8}"
          + ("  TFLOP/s" if cuda else ""))
    for T in tokens:
        hidden, weight, targets = inputs(T, H, args.vocab, dtype, args.device)
        for backward in (False, True):
            results = {name: (best_time(fn, hidden, weight, targets, backward, args.device, args.repeats),
                              memory(name, T, backward)) for name, fn in providers.items()}
            base_t, base_m = results["naive"]
            for name, (t, m) in results.items():
                flops = (6 if backward else 2) * T * H * args.vocab  # matmuls: forward 2·T·H·V, backward twice that
                line = (f"{T:>6} {'fwd+bwd' if backward else 'fwd':>8} {name:>9} {t * 1e3:>9.1f} {m / 2**20:>9.1f} "
                        f"{base_t / t:>15.2f}x {base_m / max(m, 1):>7.1f}x")
                print(line + (f"  {flops / t / 1e12:7.1f}" if cuda else ""), flush=True)


if __name__ == "__main__":
    main()
