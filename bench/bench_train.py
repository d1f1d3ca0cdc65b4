"""Training-step tokens/s and peak memory: minalign's SFT and DPO steps vs transformers, same process, same weights.

    python bench/bench_train.py [--batch 8] [--prompt-tokens 128] [--response-tokens 128] [--repeats 3]
                                [--device cpu|cuda] [--dtype float32|bfloat16] [--no-memory] [--profile]

A ~20M-parameter Mistral-shaped model (d_model 256, 4 layers, GQA 8/2, intermediate 1024, vocab 32000) with random
weights is written once as an HF checkpoint and loaded by both sides (fp32 master weights, as train.py keeps).
Every step is forward + backward + global grad-norm clip (1.0) + AdamW (train.py's defaults: lr 1e-5, betas
(0.9, 0.95), eps 1e-8, no weight decay) + zero_grad, timed best-of-N after a warm-up step:

  sft       minalign, train.py's SFT step: sequence_logprobs (hidden states + lm_head weight, only the positions
            that predict a response token through the lm_head) → sft_loss → backward → clip → AdamW
            (trainer.make_optimizer)
  hf-sft    MistralForCausalLM(input_ids, labels) with labels −100 on the prompt tokens (its mean token loss over
            full [B, T, V] logits) → backward → clip → torch.optim.AdamW with the same settings
  dpo       minalign, train.py's DPO step with cached reference log-probs: one policy sequence_logprobs over
            chosen + rejected (2·batch sequences) → dpo_loss (sigmoid, β 0.1) → backward → clip → AdamW
  sft-pairs the SFT step over the same chosen + rejected tokens (the DPO step's baseline: goal ≤ 1.1×)

--dtype bfloat16 runs both sides under bf16 autocast over the fp32 weights (train.py's mixed precision on CUDA).
Peak memory: the peak above the level before the step (after a warm-up step, so AdamW's state exists); on CPU the
peak RSS of a fresh process with every large tensor its own mapping (bench_logprob.py's method), on CUDA
max_memory_allocated. On CUDA it also prints the MFU of a ~1B-parameter config (6·N·tokens / time / peak, N the
parameters that do matmuls — all but the embedding — and peak the GPU's dense bf16 TFLOP/s).
"""
import argparse
import functools
import os
import subprocess
import sys
import tempfile
import time

import torch
from transformers import MistralForCausalLM

import minalign
from bench_logprob import PeakMemory
from gpu import PEAK_BF16_TFLOPS, sync
from minalign.logprobs import sequence_logprobs
from minalign.losses import dpo_loss, sft_loss
from minalign.train import TrainConfig, make_optimizer

SMALL = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2)
BIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=16,
           num_key_value_heads=4)  # ~1.04B parameters, for the CUDA MFU figure
GRAD_CLIP = 1.0
BETA = 0.1


def config(shape):
    return minalign.get_config("mistral-7b-v0.1", sliding_window=None, **shape)


def make_batch(args, vocab):
    """prompts [B], chosen [B], rejected [B] as lists of ids (fixed lengths: no padding on either side)."""
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(3, vocab, (args.batch, n), generator=g).tolist()

    return ids(args.prompt_tokens), ids(args.response_tokens), ids(args.response_tokens)


class Steps:
    """The four training steps on models loaded from one checkpoint dir."""

    def __init__(self, weights, args, which):
        self.args = args
        self.device = args.device
        self.autocast_dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
        cfg = TrainConfig()  # train.py's optimizer defaults
        self.ours = self.hf = None
        if which & {"sft", "dpo", "sft-pairs"}:
            self.ours = minalign.load_model(weights, dtype=torch.float32, device=self.device).train()
            self.opt = make_optimizer(self.ours, cfg)
        if "hf-sft" in which:
            self.hf = MistralForCausalLM.from_pretrained(weights, dtype=torch.float32).to(self.device).train()
            t = cfg.train
            self.hf_opt = torch.optim.AdamW(self.hf.parameters(), lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                            weight_decay=t.weight_decay)
        vocab = (self.ours or self.hf).config.vocab_size
        self.prompts, self.chosen, self.rejected = make_batch(args, vocab)
        self.ref = None
        if "dpo" in which:  # the cached reference: the initial policy's log-probs, computed once without grad
            with torch.no_grad(), self.autocast():
                ref, _ = sequence_logprobs(self.ours, self.prompts * 2, self.chosen + self.rejected,
                                           batch_tokens=self._batch_tokens(2))
            self.ref = ref.float()

    def autocast(self):
        return torch.autocast(self.device, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)

    def _batch_tokens(self, factor):
        # train.py: batch_tokens = rows × data.max_length, i.e. the micro-batch is one forward
        return factor * self.args.batch * (self.args.prompt_tokens + self.args.response_tokens)

    def _finish(self, model, opt):
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sft(self, pairs=False):
        prompts, responses = (self.prompts * 2, self.chosen + self.rejected) if pairs else (self.prompts, self.chosen)
        with self.autocast():
            sums, counts = sequence_logprobs(self.ours, prompts, responses,
                                             batch_tokens=self._batch_tokens(2 if pairs else 1))
            loss = sft_loss(sums, sum(len(r) for r in responses))
        loss.backward()
        self._finish(self.ours, self.opt)
        return loss.detach()

    def sft_pairs(self):
        return self.sft(pairs=True)

    def dpo(self):
        n = len(self.prompts)
        with self.autocast():
            sums, _ = sequence_logprobs(self.ours, self.prompts * 2, self.chosen + self.rejected,
                                        batch_tokens=self._batch_tokens(2))
            losses, _, _ = dpo_loss(sums[:n], sums[n:], self.ref[:n], self.ref[n:], BETA)
            loss = losses.sum() / n
        loss.backward()
        self._finish(self.ours, self.opt)
        return loss.detach()

    def hf_sft(self):
        ids = torch.tensor([p + r for p, r in zip(self.prompts, self.chosen)], device=self.device)
        labels = ids.clone()
        labels[:, :self.args.prompt_tokens] = -100  # HF shifts: labels[t] is predicted at position t − 1
        with self.autocast():
            loss = self.hf(input_ids=ids, labels=labels).loss
        loss.backward()
        self._finish(self.hf, self.hf_opt)
        return loss.detach()

    def run(self, name):
        return {"sft": self.sft, "hf-sft": self.hf_sft, "dpo": self.dpo, "sft-pairs": self.sft_pairs}[name]()


def interleaved_times(fns, repeats, device):
    """{name: [wall times]} of `repeats` runs of each fn after one warm-up each, run round-robin (a, b, c, a, b,
    c, ...) so that load from other processes on a shared machine falls on every side alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def step_memory(weights, args, name):
    """Peak bytes above the pre-step level of one step `name` (after a warm-up step)."""
    steps = Steps(weights, args, {name})
    steps.run(name)
    with PeakMemory(args.device) as mem:
        steps.run(name)
    return mem.peak


def memory(weights, args, name):
    if args.device == "cuda":
        out = step_memory(weights, args, name)
        torch.cuda.empty_cache()
        return out
    # A fresh process with a fixed mmap threshold: every large tensor its own mapping, returned on free, so the
    # peak RSS sees each allocation (see bench_logprob.py).
    cmd = [sys.executable, *sys.argv, "--memory-of", name, weights]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    return int(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.split()[-1])


def profile(steps, name, rows=18):
    from torch.profiler import ProfilerActivity, profile as prof
    steps.run(name)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if steps.device == "cuda" else [])
    with prof(activities=activities) as p:
        steps.run(name)
    key = "self_cuda_time_total" if steps.device == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of one {name} step (self time):")
    print(p.key_averages().table(sort_by=key, row_limit=rows))


def mfu(args):
    """MFU of minalign's SFT step (and transformers') on a ~1B config, bf16 autocast over fp32 weights."""
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if peak is None:
        print(f"\nMFU: unknown peak for {name!r}; pass --peak-tflops")
        return
    big = argparse.Namespace(**{**vars(args), "dtype": "bfloat16", "batch": args.mfu_batch,
                                "prompt_tokens": args.mfu_seq // 2, "response_tokens": args.mfu_seq // 2})
    cfg = config(BIG)
    with tempfile.TemporaryDirectory() as d:
        model = minalign.Transformer(cfg).init_weights(std=0.02, seed=0)
        n_matmul = model.num_parameters() - model.model.embed_tokens.weight.numel()
        n_total = model.num_parameters()
        minalign.save_model(model, d)
        del model
        tokens = big.batch * args.mfu_seq
        print(f"\nMFU, {n_total / 1e9:.2f}B-parameter config ({n_matmul / 1e9:.2f}B in matmuls), bf16 autocast, "
              f"{big.batch} × {args.mfu_seq} tokens, {name}, peak {peak:.0f} TFLOP/s:")
        for side in ("sft", "hf-sft"):
            steps = Steps(d, big, {side})
            t = min(interleaved_times({side: lambda s=steps, k=side: s.run(k)}, args.repeats, "cuda")[side])
            achieved = 6 * n_matmul * tokens / t / 1e12
            print(f"  {side:>7}: {t * 1e3:8.1f} ms/step  {tokens / t:9.0f} tok/s  {achieved:6.1f} TFLOP/s  "
                  f"MFU {achieved / peak:5.1%}")
            del steps
            torch.cuda.empty_cache()
    print("  (6·N·tokens counts the lm_head over every token; minalign runs it only on the response half, so its "
          "true FLOPs are a little lower than counted)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="sequences (SFT) / pairs (DPO)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--response-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", help="float32, or bfloat16 (autocast over fp32 weights)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory figures")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables of the sft and dpo steps")
    ap.add_argument("--mfu-batch", type=int, default=8, help="CUDA MFU run: sequences")
    ap.add_argument("--mfu-seq", type=int, default=1024, help="CUDA MFU run: tokens per sequence")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name)")
    ap.add_argument("--memory-of", nargs=2, metavar=("STEP", "WEIGHTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.manual_seed(0)

    if args.memory_of:  # child process of a CPU run: one peak-memory figure, printed for the parent
        print(step_memory(args.memory_of[1], args, args.memory_of[0]))
        return

    names = ["sft", "hf-sft", "dpo", "sft-pairs"]
    with tempfile.TemporaryDirectory() as d:
        model = minalign.Transformer(config(SMALL)).init_weights(std=0.05, seed=0)
        n_params = model.num_parameters()
        minalign.save_model(model, d)
        del model
        steps = Steps(d, args, set(names))
        T = args.prompt_tokens + args.response_tokens
        print(f"model: {n_params / 1e6:.1f}M params, fp32 weights, compute {args.dtype}, {args.device}, "
              f"threads {torch.get_num_threads()}; {args.batch} sequences × {T} tokens ({args.prompt_tokens} prompt "
              f"+ {args.response_tokens} response); DPO: {args.batch} pairs (chosen + rejected = {2 * args.batch} "
              f"sequences)")
        # Same weights, same targets: the first losses agree (each step moves its own copy of the weights after).
        l_ours, l_hf = Steps(d, args, {"sft"}).sft(), Steps(d, args, {"hf-sft"}).hf_sft()
        print(f"first SFT loss: minalign {l_ours.item():.6f}, transformers {l_hf.item():.6f}")
        # Best of N, round-robin; also the ratio of each round's pair, whose range shows the noise.
        runs = interleaved_times({name: functools.partial(steps.run, name) for name in names}, args.repeats,
                                 args.device)
        times = {name: min(ts) for name, ts in runs.items()}
        mems = {} if args.no_memory else {name: memory(d, args, name) for name in names}
        tokens = {"sft": args.batch * T, "hf-sft": args.batch * T, "dpo": 2 * args.batch * T,
                  "sft-pairs": 2 * args.batch * T}
        print(f"{'step':>10} {'ms/step':>9} {'tok/s':>8} {'peak MB':>8}")
        for name in names:
            mem = f"{mems[name] / 2**20:8.0f}" if mems else f"{'-':>8}"
            print(f"{name:>10} {times[name] * 1e3:9.1f} {tokens[name] / times[name]:8.0f} {mem}")
        def spread(a, b):  # the range of the per-round ratios a/b
            r = [x / y for x, y in zip(runs[a], runs[b])]
            return f"(per round {min(r):.2f}-{max(r):.2f}x)"

        print(f"SFT step, minalign vs transformers: {times['hf-sft'] / times['sft']:.2f}x tokens/s "
              f"{spread('hf-sft', 'sft')} (goal >= 1.0x, aim 1.3x)"
              + (f", {mems['hf-sft'] / max(mems['sft'], 1):.1f}x less peak memory" if mems else ""))
        print(f"DPO step (cached reference) vs SFT step on the same chosen + rejected tokens: "
              f"{times['dpo'] / times['sft-pairs']:.2f}x the time {spread('dpo', 'sft-pairs')} (goal <= 1.1x)")
        if args.profile:
            for name in ("sft", "hf-sft", "dpo"):
                profile(steps, name)
    if args.device == "cuda":
        del steps
        torch.cuda.empty_cache()
        mfu(args)


if __name__ == "__main__":
    main()
