"""Tokens/s of minalign.generate vs transformers' generate(), same process, same weights, same settings.

    python bench/bench_sample.py [--batch-sizes 1 8 32] [--new-tokens 64] [--dtype float32|bfloat16]
                                 [--device cpu|cuda] [--compile]
    python bench/bench_sample.py --long-tail [--slots 32 64] [--prompts 256] [--samples 4] [--dtype bfloat16]
    python bench/bench_sample.py --long-tail --uniform --max-new-tokens 64 ...   # every sample as long
    python bench/bench_sample.py --drift
    python bench/bench_sample.py --host-share

A ~20M-parameter Mistral-shaped model (d_model 256, 4 layers, GQA 8/2, vocab 32000) with random weights is
written once as an HF checkpoint and loaded by both. Both sample with temperature 1, top-k 50, top-p 1 and a
forced length (no EOS), so both generate exactly batch × new-tokens tokens. Also prints the share of
minalign's decode time spent in the sampling work (filtering + drawing + log-probs).

--long-tail: response lengths as a real round has them, from a few tokens to the budget. The random weights'
softmax is nearly uniform, so with 2 % of the vocabulary (640 ids) as stop tokens, temperature 1 and no top-k,
each step stops a row with probability ~1/50: geometric lengths, mean ~50, cut at --max-new-tokens 512. Every
provider samples --prompts prompts × --samples samples in the same number of rows in flight ("slots"):
continuous batching (minalign now), the static batches of the previous sampler (commit STATIC_COMMIT, loaded
from git: eager, where finished rows leave the batch, and compile=True, where they stay), and transformers'
generate (batches of slots rows; a finished row stays until the batch ends). Two figures each: slot utilisation
= useful tokens / (decode steps × slots), what a GPU, whose decode step costs about the same at any batch size,
would waste; and tokens/s on this machine.

--drift: how far a sample's log-probs move with the schedule: tiny random Mistral (sliding window 8, shorter than
prompt + response) and Mixtral models in fp32, prompts of 1-30 tokens, 3 samples each, ~1/8 stop tokens;
continuous and static at 1, 3, 8 slots and at every sample at once. Prints whether the token ids agree and the
largest log-prob difference.

--host-share: where a decode step's time goes on this machine: generate, 16 slots × 64 new tokens, vocab 32000,
for a tiny (d_model 64, 2 layers) and a small (512, 4) model, with the decode forward, sample_step and the
prefills timed by wrapping them; the rest is the per-step host work (the per-sample RNG, the copy of the tokens
to the host, the scheduler's bookkeeping).
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from transformers import MistralForCausalLM

import minalign
from minalign import sampling


def best_time(fn, repeats):
    """Best wall time of `repeats` runs after one warm-up (the minimum is the least noisy estimate)."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


STATIC_COMMIT = "eb11c76"  # the last commit with the static-batch sampler (minalign/sampling.py)


def static_sampler():
    """The previous sampler's module (static batches), from git: the competitor as it was, not a copy kept here."""
    root = Path(__file__).resolve().parent.parent
    try:
        source = subprocess.run(["git", "show", f"{STATIC_COMMIT}:minalign/sampling.py"], cwd=root, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"the static sampler of {STATIC_COMMIT} is not in this checkout's history ({e}); skipping it")
        return None
    module = types.ModuleType("static_sampling")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{STATIC_COMMIT}:minalign/sampling.py", "exec"), module.__dict__)
    return module


def long_tail(args, ours, hf, cfg):
    """The --long-tail comparison (module doc): utilisation and tokens/s of each provider at each slot count."""
    # 2 % of the ids stop a row; a random model draws ~uniformly. --uniform: none, every sample runs to the budget.
    stops = [] if args.uniform else list(range(cfg.vocab_size - 640, cfg.vocab_size))
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(8, 65, (args.prompts,), generator=gen).tolist()  # prompts of 8-64 tokens
    prompts = [torch.randint(3, cfg.vocab_size - 640, (n,), generator=gen).tolist() for n in lengths]
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=stops, seed=0)
    old = static_sampler()
    for S in args.slots:
        rows: dict[str, tuple[float, int, int]] = {}  # provider -> (seconds, useful tokens, decode steps)

        def measure(name, run):  # the best of --long-tail-repeats runs (this VM's timings vary by ±20 %)
            for _ in range(args.long_tail_repeats):
                steps = [0]
                t = time.perf_counter()
                useful = run(lambda k: steps.__setitem__(0, steps[0] + 1))
                seconds = time.perf_counter() - t
                if name not in rows or seconds < rows[name][0]:
                    rows[name] = (seconds, useful, steps[0])

        def ours_run(schedule, compile_):
            def run(count):
                out = sampling.generate(ours, prompts, n=args.samples, slots=S, schedule=schedule, compile=compile_,
                                        progress=count, **kw)
                return sum(len(s.token_ids) for row in out for s in row)
            return run

        def old_run(compile_):
            def run(count):  # the previous sample stage's batches: S // samples prompts, longest first
                order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
                per = max(1, S // args.samples)
                out = [old.generate(ours, [prompts[i] for i in order[b:b + per]], n=args.samples, compile=compile_,
                                    prompt_keys=order[b:b + per], progress=count, **kw)
                       for b in range(0, len(order), per)]
                return sum(len(s.token_ids) for batch in out for row in batch for s in row)
            return run

        def hf_run(count):
            useful = 0
            flat = [p for p in sorted(prompts, key=len, reverse=True) for _ in range(args.samples)]
            for i in range(0, len(flat), S):
                batch = flat[i:i + S]
                T = max(map(len, batch))
                ids = torch.zeros(len(batch), T, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for b, p in enumerate(batch):
                    ids[b, T - len(p):], mask[b, T - len(p):] = torch.tensor(p), 1
                with torch.no_grad():
                    out = hf.generate(ids.to(args.device), attention_mask=mask.to(args.device), do_sample=True,
                                      temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                                      min_new_tokens=0 if stops else args.max_new_tokens,
                                      eos_token_id=stops or None, pad_token_id=0)
                new = out[:, T:]
                for _ in range(new.shape[1]):
                    count(0)
                hit = torch.isin(new, torch.tensor(stops, dtype=torch.long, device=new.device))
                done = hit.int().cumsum(-1)  # useful: the tokens up to and with each row's first stop
                useful += int(((done == 0) | ((done == 1) & hit)).sum())
            return useful

        measure("continuous", ours_run("continuous", False))
        if args.compile:
            measure("continuous, compiled", ours_run("continuous", True))
        if old is not None:
            measure(f"static {STATIC_COMMIT} eager", old_run(False))
            if args.compile:
                measure(f"static {STATIC_COMMIT} compiled", old_run(True))
        if not args.skip_transformers:
            measure("transformers", hf_run)
        base = rows.get(f"static {STATIC_COMMIT} eager")
        base_rate = base[1] / base[0] if base else None
        print(f"\n{S} slots, {args.prompts} prompts × {args.samples} samples:")
        print(f"{'provider':>28} {'utilisation':>12} {'steps':>7} {'tokens':>8} {'tok/s':>8} {'vs static eager':>16}")
        for name, (sec, useful, steps) in rows.items():
            ratio = f"{useful / sec / base_rate:.2f}x" if base else "-"
            print(f"{name:>28} {useful / max(1, steps * S):>11.1%} {steps:>7} {useful:>8} {useful / sec:>8.0f} "
                  f"{ratio:>16}")
    out = sampling.generate(ours, prompts, n=args.samples, slots=args.slots[0], **kw)
    got = sorted(len(s.token_ids) for row in out for s in row)
    print(f"\nresponse lengths: mean {statistics.mean(got):.1f}, median {statistics.median(got)}, "
          f"p90 {got[int(0.9 * len(got))]}, max {got[-1]} (cut at {args.max_new_tokens}: "
          f"{sum(n == args.max_new_tokens for n in got)})")


def drift():
    """The --drift measurement (module doc)."""
    import itertools
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 103, (n,), generator=gen).tolist() for n in (2, 17, 5, 30, 9, 1)]
    kw = dict(n=3, max_new_tokens=20, temperature=1.0, seed=2, stop_token_ids=list(range(3, 103, 8)))
    for name in ("tiny-mistral", "tiny-mixtral"):
        cfg = minalign.get_config(name, vocab_size=103, sliding_window=8)
        model = minalign.Transformer(cfg).init_weights(std=0.1, seed=0).eval()
        runs = [sampling.generate(model, prompts, slots=slots, schedule=schedule, **kw)
                for slots in (None, 1, 3, 8) for schedule in sampling.SCHEDULES]
        pairs = [(x, y) for a, b in itertools.combinations(runs, 2) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
        same = all(x.token_ids == y.token_ids for x, y in pairs)
        worst = max(abs(p - q) for x, y in pairs for p, q in zip(x.logprobs, y.logprobs))
        lengths = sorted({len(s.token_ids) for row in runs[0] for s in row})
        print(f"{name}: token ids {'identical' if same else 'DIFFER'} over {len(runs)} schedules; largest log-prob "
              f"difference {worst:.2g}; sample lengths {lengths}")


def host_share():
    """The --host-share figures (module doc)."""
    for hidden, layers in ((64, 2), (512, 4)):
        cfg = minalign.get_config("tiny-mistral", vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                                  max_position_embeddings=512)
        model = minalign.Transformer(cfg).init_weights(seed=0).eval()
        spent = {}
        real = {"decode": sampling._decode, "sample": sampling.sample_step, "prefill": sampling.KVCache.prefill}

        def timed(name):
            def fn(*a, **k):
                t = time.perf_counter()
                out = real[name](*a, **k)
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
                return out
            return fn
        sampling._decode, sampling.sample_step = timed("decode"), timed("sample")
        sampling.KVCache.prefill = timed("prefill")
        prompts = [[1] + [5] * 15 for _ in range(16)]
        try:
            sampling.generate(model, prompts, max_new_tokens=8, temperature=1.0, slots=16)  # warm-up
            spent.clear()
            t = time.perf_counter()
            sampling.generate(model, prompts, max_new_tokens=64, temperature=1.0, slots=16)
            total = time.perf_counter() - t
        finally:
            sampling._decode, sampling.sample_step, sampling.KVCache.prefill = real.values()
        rest = total - sum(spent.values())
        print(f"d_model {hidden}, {layers} layers, 16 slots × 64 tokens, {total * 1e3:.0f} ms: decode forward "
              f"{spent['decode'] / total:.1%}, sample_step {spent['sample'] / total:.1%}, prefill "
              f"{spent['prefill'] / total:.1%}, per-step host work {rest / total:.1%}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--long-tail", action="store_true", help="the long-tail comparison of continuous batching")
    ap.add_argument("--slots", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--uniform", action="store_true", help="--long-tail without stop tokens: every sample is as long")
    ap.add_argument("--long-tail-repeats", type=int, default=1, help="--long-tail: the best of this many runs each")
    ap.add_argument("--drift", action="store_true", help="log-prob drift across schedules (tiny fp32 models)")
    ap.add_argument("--host-share", action="store_true", help="where a decode step's time goes (module doc)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--compile", action="store_true", help="minalign with compile=True (warm-up compile not timed)")
    args = ap.parse_args()
    if args.host_share:
        torch.set_num_threads(1)
        return host_share()
    if args.drift:
        return drift()
    torch.manual_seed(0)
    cfg = minalign.get_config("mistral-7b-v0.1", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                              num_attention_heads=8, num_key_value_heads=2, sliding_window=None)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as d:
        minalign.save_model(minalign.Transformer(cfg).init_weights(std=0.05, seed=0), d)
        ours = minalign.load_model(d, dtype=dtype, device=args.device).eval()
        hf = MistralForCausalLM.from_pretrained(d, dtype=dtype).to(args.device).eval()
    if args.long_tail:
        print(f"model: {ours.num_parameters() / 1e6:.1f}M params, {args.dtype}, {args.device}, threads "
              f"{torch.get_num_threads()}")
        return long_tail(args, ours, hf, cfg)
    n_params = ours.num_parameters()
    print(f"model: {n_params / 1e6:.1f}M params, {args.dtype}, {args.device}, threads {torch.get_num_threads()}, "
          f"minalign {'compiled' if args.compile else 'eager'}; "
          f"{args.prompt_tokens} prompt + {args.new_tokens} new tokens, temperature 1, top-k 50, top-p 1")

    # Time the sampling work inside our decode loop by wrapping sample_step.
    spent = {"t": 0.0}
    inner = sampling.sample_step

    def timed_step(*a, **k):
        t = time.perf_counter()
        out = inner(*a, **k)
        spent["t"] += time.perf_counter() - t
        return out

    print(f"{'batch':>5} {'minalign tok/s':>15} {'transformers tok/s':>19} {'ratio':>7} {'sampling share':>15}")
    for B in args.batch_sizes:
        prompts = torch.randint(3, cfg.vocab_size, (B, args.prompt_tokens)).tolist()

        def run_ours():
            sampling.generate(ours, prompts, max_new_tokens=args.new_tokens, temperature=1.0, top_k=50, top_p=1.0,
                              seed=0, compile=args.compile)

        def run_hf():
            ids = torch.tensor(prompts, device=args.device)
            with torch.no_grad():
                hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=50,
                            top_p=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                            eos_token_id=None, pad_token_id=0)

        t_ours = best_time(run_ours, args.repeats)
        t_hf = best_time(run_hf, args.repeats)
        sampling.sample_step = timed_step
        spent["t"] = 0.0
        t = time.perf_counter()
        run_ours()
        share = spent["t"] / (time.perf_counter() - t)
        sampling.sample_step = inner
        tokens = B * args.new_tokens
        print(f"{B:>5} {tokens / t_ours:>15.0f} {tokens / t_hf:>19.0f} {t_hf / t_ours:>6.2f}x {share:>14.0%}")


if __name__ == "__main__":
    main()
