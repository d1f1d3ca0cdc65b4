"""The alignment loop: rounds of sample → score → select → train, each round starting from the last one's policy.

    round k:  policy π_k ── sample N per prompt (round_k/prompts.jsonl → samples.jsonl) ── score (→ scores.jsonl)
              ── evaluate π_k on the held-out prompts (eval_samples.jsonl → eval_scores.jsonl → metrics.json)
              ── select (→ train.jsonl) ── train from π_k (→ train/final = π_{k+1})

Two recipes:
- rejection-sampling (Merlinite-7B-pt): keep each prompt's highest-reward sample; SFT π_k on them. Rounds run to
  loop.rounds, or until the batch reward has not improved for loop.patience rounds (Merlinite-7B-pt's reward
  rose to round 2 and saturated at round 3); the result is the policy with the peak batch reward. (With PairRM,
  whose scores only rank the samples of one prompt, every round runs and the result is the last policy.)
- iterative-dpo (Snorkel-Mistral-PairRM-DPO): chosen = the top-ranked sample, rejected = the bottom-ranked; DPO
  from π_k. The DPO reference is a setting, since public recipes differ: loop.dpo_reference = "previous" (π_k,
  the policy the round starts from) or "initial" (π_0).

Round k's metrics describe the policy round k starts from (round 0: the starting policy): batch_reward (mean
reward of all its samples), batch_reward_max (mean over prompts of the best sample's reward: what selection
keeps), eval_reward (mean reward on the held-out prompts), mean_length (response tokens; reward-based selection
drifts toward length, so watch it), accuracy (the ground-truth metric on the held-out prompts, when one is
given). The last round, loop.rounds, only samples, scores and evaluates the last policy.

Every stage reads files and writes one artifact atomically; a stage whose artifact exists is done. So a killed
loop, started again with the same settings, resumes at the first unfinished stage (sampling, scoring and training
also resume inside the stage, from their partial files and checkpoints) and redoes nothing. The sample and
score stages are sample.py and score.py themselves (minalign/stages), run in this process; their command lines
are printed, so a round can be audited or redone by hand.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from minalign import distributed
from minalign.chat import TEMPLATES, render_prompt
from minalign.config import from_hf_config
from minalign.cli import CliError, changed_settings, on_main, read_settings, run_lock
from minalign.data import DataError, as_messages, atomic_write, prompt_of, read_jsonl, write_jsonl
from minalign.demo import DemoSection
from minalign.rewards import NORMALIZE, REWARD_KINDS, call_source, load_function, reward_source, score_rows
from minalign.selection import select_best, select_pairs
from minalign.stages import sample as sample_stage
from minalign.stages import score as score_stage
from minalign.tokenizer import load_tokenizer
from minalign.trainer import (MAX_SEED, DataSection, DPOSection, ModelSection, TrainConfig, TrainSection,
                              check_config, latest_checkpoint, open_policy, train)

RECIPES = ("rejection-sampling", "iterative-dpo")


# ----------------------------------------------------------------------------------------------- configuration

@dataclass
class LoopSection:
    recipe: str = "rejection-sampling"  # or "iterative-dpo"
    out: str = ""  # the run dir; "{recipe}" in it is replaced by the recipe's name
    rounds: int = 3  # training rounds at most; round `rounds` then evaluates the last policy
    patience: int = 1  # stop after this many rounds without a higher batch reward (0 = run every round)
    seed: int = 0  # prompt draws, held-out split and sampling seeds
    epochs: float = 0.0  # > 0: each round trains ceil(epochs · rows / train.batch_size) steps (else train.steps)
    warmup_ratio: float = 0.0  # > 0: train.warmup_steps = round(warmup_ratio · steps) each round
    dpo_reference: str = "previous"  # iterative-dpo: "previous" (π_k) or "initial" (π_0)
    keep_checkpoints: bool = False  # keep each round's trainer checkpoints/ (with optimizer state) after final/


@dataclass
class PolicySection:
    path: str = ""  # the starting policy π_0, an HF checkpoint dir with tokenizer files
    template: str = "mistral"  # its chat template (sampling and training)
    system: str = ""  # a system message for prompts without one ("" = none; merlinite: the model card's)


@dataclass
class PromptsSection:
    path: str = ""  # the pool: {"id"?, "prompt" | "messages", "source"?} rows
    per_round: int = 0  # prompts drawn each round (0 = the whole pool)
    by_source: bool = False  # draw uniformly by "source" (as Merlinite-7B-pt sampled the LAB data), else uniformly
    eval_path: str = ""  # held-out prompts; "" = hold out eval_size prompts of the pool
    eval_size: int = 0  # prompts held out of the pool when eval_path is ""


@dataclass
class SampleSection:
    n: int = 4  # samples per prompt
    max_new_tokens: int = 256  # most tokens a response may have (then it is cut: finish_reason "length")
    temperature: float = 0.7  # of the policy's samples (0 = greedy)
    top_k: int = 0  # sample from the k likeliest tokens only (0 = all)
    top_p: float = 1.0  # nucleus: sample from the likeliest tokens whose probabilities sum to top_p
    batch_size: int = 16  # prompts per generate call


@dataclass
class EvalSection:
    n: int = 1  # samples per held-out prompt
    temperature: float = -1.0  # < 0: sample.temperature
    metric: str = ""  # ground truth: a 'module:function' of the reward interface, 1.0/0.0 per response ("" = none)


@dataclass
class RewardSection:
    kind: str = "log-ratio"  # log-ratio | pairrm | python
    policy: str = ""  # log-ratio: the "instruct" model (Mixtral-8x7B-Instruct-v0.1)
    reference: str = ""  # log-ratio: the base model (Mixtral-8x7B-v0.1); "" = reference-free
    policy_template: str = ""  # log-ratio: the template reward.policy was trained on (no default: see score.py)
    reference_template: str = ""  # log-ratio: the template reward.reference was trained on
    normalize: str = "sum"  # sum | mean (per response token)
    beta: float = 1.0  # log-ratio: reward = beta · (log π_policy − log π_ref)
    sampler_end_ids: list = field(default_factory=list)  # see score.py --sampler-end-ids
    batch_tokens: int = 16384  # padded tokens per scoring forward
    fsdp: bool = False  # under torchrun: shard each reward model over the ranks
    path: str = ""  # pairrm: the PairRM checkpoint dir
    function: str = ""  # python: 'module:function' or 'path/to/file.py:function'


@dataclass
class SelectSection:
    keep_truncated: bool = False  # let responses cut at max_new_tokens be selected (they would be trained to end)
    min_margin: float = 0.0  # iterative-dpo: skip a prompt whose top and bottom rewards differ by this or less


@dataclass
class LoopConfig:
    loop: LoopSection = field(default_factory=LoopSection)
    policy: PolicySection = field(default_factory=PolicySection)
    prompts: PromptsSection = field(default_factory=PromptsSection)
    sample: SampleSection = field(default_factory=SampleSection)
    eval: EvalSection = field(default_factory=EvalSection)
    reward: RewardSection = field(default_factory=RewardSection)
    select: SelectSection = field(default_factory=SelectSection)
    data: DataSection = field(default_factory=DataSection)  # the trainer's (data.path is set each round)
    train: TrainSection = field(default_factory=TrainSection)  # the trainer's (mode, out, steps set each round)
    dpo: DPOSection = field(default_factory=DPOSection)
    demo: DemoSection = field(default_factory=lambda: DemoSection(out=""))  # demo.out "" = not the demo

    @property
    def run_dir(self) -> Path:
        return Path(self.loop.out.replace("{recipe}", self.loop.recipe))


def load_loop_config(path: str | None, overrides: list[tuple[str, str]] = ()) -> LoopConfig:
    """A LoopConfig from a TOML file and `section.key value` overrides, checked (CliError naming the problem)."""
    cfg = read_settings(LoopConfig(), path, overrides)
    lp, p, s, r = cfg.loop, cfg.prompts, cfg.sample, cfg.reward
    problems = {
        f"loop.recipe must be one of {RECIPES}": lp.recipe not in RECIPES,
        "loop.out is required": not lp.out,
        "loop.rounds must be >= 1": lp.rounds < 1, "loop.patience must be >= 0": lp.patience < 0,
        "loop.epochs and loop.warmup_ratio must be finite and >= 0": not (0 <= lp.epochs < math.inf and
                                                                           0 <= lp.warmup_ratio < math.inf),
        f"loop.seed must be in [0, {MAX_SEED})": not 0 <= lp.seed < MAX_SEED,
        "train.batch_size must be >= 1": cfg.train.batch_size < 1,
        "loop.dpo_reference must be previous or initial": lp.dpo_reference not in ("previous", "initial"),
        "policy.path is required": not cfg.policy.path,
        f"policy.template must be one of {sorted(TEMPLATES)}": cfg.policy.template not in TEMPLATES,
        "prompts.path is required": not p.path,
        "prompts.per_round and prompts.eval_size must be >= 0": min(p.per_round, p.eval_size) < 0,
        "give prompts.eval_path or prompts.eval_size, not both": bool(p.eval_path) and p.eval_size > 0,
        "sample.n must be >= 2 (selection compares samples)": s.n < 2,
        "sample.max_new_tokens, sample.batch_size, eval.n must be >= 1": min(s.max_new_tokens, s.batch_size,
                                                                              cfg.eval.n) < 1,
        "sample.temperature must be >= 0": s.temperature < 0,
        "sample.top_p must be in (0, 1]": not 0 < s.top_p <= 1,
        f"reward.kind must be one of {REWARD_KINDS}": r.kind not in REWARD_KINDS,
        "reward.policy is required for a log-ratio reward": r.kind == "log-ratio" and not r.policy,
        "reward.policy_template is required for a log-ratio reward (the template reward.policy was trained on)":
            r.kind == "log-ratio" and r.policy_template not in TEMPLATES,
        "reward.reference_template is required with reward.reference (the template it was trained on)":
            r.kind == "log-ratio" and bool(r.reference) and r.reference_template not in TEMPLATES,
        "reward.path is required for a pairrm reward": r.kind == "pairrm" and not r.path,
        "reward.function is required for a python reward": r.kind == "python" and not r.function,
        f"reward.normalize must be one of {NORMALIZE}": r.normalize not in NORMALIZE,
    }
    bad = [msg for msg, wrong in problems.items() if wrong]
    if bad:
        raise CliError("; ".join(bad))
    check_config(round_train_config(cfg, 0, Path(cfg.policy.path), Path("train.jsonl"), 1))
    return cfg


def round_train_config(cfg: LoopConfig, k: int, policy: Path, data: Path, rows: int) -> TrainConfig:
    """The trainer's settings for round k: from policy, on data (rows selected), into round_k/train."""
    t = dataclasses.replace(cfg.train, mode="sft" if cfg.loop.recipe == "rejection-sampling" else "dpo",
                            out=str(data.parent / "train"), seed=cfg.train.seed + k)
    if cfg.loop.epochs:
        t.steps = max(1, math.ceil(cfg.loop.epochs * rows / t.batch_size))
    if cfg.loop.warmup_ratio:
        t.warmup_steps = round(cfg.loop.warmup_ratio * t.steps)
    reference = cfg.policy.path if cfg.loop.dpo_reference == "initial" else ""
    return TrainConfig(model=ModelSection(path=str(policy), template=cfg.policy.template, reference=reference),
                       data=dataclasses.replace(cfg.data, path=str(data)), train=t, dpo=cfg.dpo)


# Settings a restarted loop may change: they change no artifact (rounds and patience only add or end rounds).
RESUMABLE_CHANGES = {"loop": {"rounds", "patience", "keep_checkpoints"}, "sample": {"batch_size"},
                     "reward": {"batch_tokens", "fsdp"},
                     "train": {"micro_batch_size", "log_every", "save_every", "keep_checkpoints", "stop_after",
                               "parallel", "activation_checkpointing", "device"}}
# Settings the loop sets itself each round (round_train_config), whatever the file says.
OVERWRITTEN = {"train": {"mode", "out", "resume"}, "data": {"path"}}
PATHS = {"loop": ["out"], "policy": ["path"], "prompts": ["path", "eval_path"], "reward": ["policy", "reference", "path"],
         "demo": ["out"]}


def _fixed_settings(cfg: LoopConfig) -> dict:
    """The settings a restart must repeat: all but RESUMABLE_CHANGES and OVERWRITTEN, with paths made absolute."""
    d = dataclasses.asdict(cfg)
    skip = {s: RESUMABLE_CHANGES.get(s, set()) | OVERWRITTEN.get(s, set()) for s in d}
    if cfg.loop.epochs:
        skip["train"] |= {"steps"}
    if cfg.loop.warmup_ratio:
        skip["train"] |= {"warmup_steps"}
    for section, keys in skip.items():
        for k in keys:
            d[section].pop(k)
    for section, keys in PATHS.items():
        for k in keys:
            if d[section][k]:
                d[section][k] = str(Path(d[section][k]).resolve())
    return d


# ---------------------------------------------------------------------------------------------------- prompts

def read_prompts(path: Path, render: Callable[[str | list[dict]], None] | None = None) -> list[dict]:
    """The rows of a prompts file, each checked (DataError naming path:line) — by render too, when given (it
    raises ValueError for a prompt the policy's template or context refuses) — and given an "id" (its line number
    when it has none); ids must be unique."""
    rows, seen = [], {}
    for line, row in read_jsonl(path):
        try:
            prompt = prompt_of(row)
            if render is not None:
                render(prompt)
        except ValueError as e:
            raise DataError(path, line, str(e)) from None
        row = {"id": line, **row}
        if row["id"] in seen:
            raise DataError(path, line, f"duplicate id {row['id']!r} (first at line {seen[row['id']]})")
        seen[row["id"]] = line
        rows.append(row)
    if not rows:
        raise CliError(f"{path}: no prompts")
    return rows


def split_pool(pool: list[dict], eval_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(pool, held-out): eval_size rows held out at random (seeded), both in file order."""
    if eval_size >= len(pool):
        raise CliError(f"prompts.eval_size {eval_size} leaves no prompts of {len(pool)} to train on")
    held = set(random.Random(f"{seed}:eval").sample(range(len(pool)), eval_size))
    return [r for i, r in enumerate(pool) if i not in held], [r for i, r in enumerate(pool) if i in held]


def draw_prompts(pool: list[dict], per_round: int, by_source: bool, seed: int, k: int) -> list[dict]:
    """Round k's prompts: per_round of the pool (0 = all), uniformly or, with by_source, the same number from each
    "source" (a source with too few prompts gives all it has). Each group is walked in a seeded random order, round
    after round, so every prompt is used once before any is used again."""
    groups: dict[str, list[dict]] = {}
    for row in pool:
        groups.setdefault(str(row.get("source", "")) if by_source else "", []).append(row)
    names = sorted(groups)
    order = {g: random.Random(f"{seed}:{g}").sample(groups[g], len(groups[g])) for g in names}
    want = per_round or len(pool)

    def quotas(r: int) -> dict[str, int]:  # prompts from each group in round r; the remainder rotates
        base, extra = divmod(want, len(names))
        lucky = {names[(r * extra + j) % len(names)] for j in range(extra)}
        return {g: min(len(groups[g]), base + (g in lucky)) for g in names}

    out = []
    for g in names:
        start = sum(quotas(r)[g] for r in range(k))  # where round k continues this group's walk
        out += [order[g][(start + i) % len(order[g])] for i in range(quotas(k)[g])]
    return out


# ---------------------------------------------------------------------------------------------------- metrics

def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def round_metrics(k: int, scores: list[dict], eval_scores: list[dict], accuracy: list[list[float]] | None) -> dict:
    """The metrics of the policy round k starts from (see the module doc)."""
    responses = [r for row in scores for r in row["responses"]]
    m = {"round": k,
         "batch_reward": _mean(r["reward"] for r in responses),
         "batch_reward_max": _mean(max(r["reward"] for r in row["responses"]) for row in scores),
         "eval_reward": _mean(r["reward"] for row in eval_scores for r in row["responses"]),
         "mean_length": _mean(len(r["token_ids"]) for r in responses),
         "truncated": _mean(r["finish_reason"] == "length" for r in responses)}
    if accuracy is not None:
        m["accuracy"] = _mean(v for row in accuracy for v in row)
    return m


COLUMNS = [("round", "round", "{}"), ("batch_reward", "batch reward", "{:.4g}"),
           ("batch_reward_max", "best-of-n", "{:.4g}"), ("eval_reward", "eval reward", "{:.4g}"),
           ("accuracy", "accuracy", "{:.3f}"), ("mean_length", "mean length", "{:.1f}"),
           ("selected", "selected", "{}")]


def table(rounds: list[dict]) -> str:
    """The per-round metrics as an aligned text table (a column only when some round has it)."""
    cols = [(key, title, fmt) for key, title, fmt in COLUMNS if any(r.get(key) is not None for r in rounds)]
    cells = [[title for _, title, _ in cols]]
    cells += [["-" if r.get(key) is None else fmt.format(r[key]) for key, _, fmt in cols] for r in rounds]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


def plot(rounds: list[dict], path: Path, title: str) -> None:
    """summary.png: batch reward (mean and best-of-n), held-out reward, accuracy and response length by round."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    x = [r["round"] for r in rounds]
    panels = [("reward", [("batch_reward", "batch (mean)"), ("batch_reward_max", "batch (best of n)"),
                          ("eval_reward", "held-out")]),
              ("accuracy (held-out)", [("accuracy", "accuracy")]),
              ("mean response length (tokens)", [("mean_length", "batch")])]
    panels = [(t, [(k, lab) for k, lab in lines if any(r.get(k) is not None for r in rounds)]) for t, lines in panels]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, lines) in zip(axes[0], panels):
        for key, label in lines:
            ax.plot(x, [r.get(key) for r in rounds], marker="o", label=label)
        ax.set_title(name, fontsize=10)
        if name.startswith("accuracy"):
            ax.set_ylim(0, 1.02)  # a share: the whole scale, so a small wiggle does not look like a trend
        ax.set_xlabel("round (the policy it starts from)")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------------- the stages

class Loop:
    """One run of the loop on this rank: the stages of each round, each skipped when its artifact exists.

    after_stage(k, name), if given, is called after each stage (done now or found done): progress reports, and
    the tests' way to kill the loop at every stage boundary.
    """

    def __init__(self, cfg: LoopConfig, rank: int = 0, world: int = 1, device: torch.device | None = None,
                 after_stage: Callable[[int, str], None] | None = None, log=None):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.device = device or torch.device("cpu")
        self.after_stage = after_stage or (lambda k, name: None)
        self.main = distributed.is_main()
        self.run_dir = cfg.run_dir
        self._log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self._python_reward = self._metric_fn = None  # imported once, when first needed

    def log(self, text: str) -> None:
        if self.main:
            self._log(f"loop: {text}")

    # -- setup ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Build the demo if this is it; check everything that can be checked before any work (paths, settings
        against a run being restarted, every prompt rendered in the policy's template, the reward and metric
        functions, the batch split); then write loop.json and the pool and held-out prompt files."""
        cfg, run = self.cfg, self.run_dir
        if cfg.demo.out:
            if self.world > 1:
                raise CliError("the demo runs in one process: python train.py, not torchrun")
            from minalign import demo
            demo.build(cfg.demo, log=self.log)
        for what, p in [("policy.path", cfg.policy.path), ("prompts.path", cfg.prompts.path),
                        ("prompts.eval_path", cfg.prompts.eval_path)]:
            if p and not Path(p).exists():
                raise CliError(f"{what} {p}: no such file or directory")
        t = cfg.train
        if t.batch_size % (self.world * t.micro_batch_size):
            raise CliError(f"train.batch_size {t.batch_size} must be a multiple of world size {self.world} × "
                           f"train.micro_batch_size {t.micro_batch_size}")
        settings = _fixed_settings(cfg)
        saved = run / "loop.json"
        if saved.is_file():
            then = json.loads(saved.read_text())["settings"]
            diffs = changed_settings(then, settings)
            if diffs:
                free = ", ".join(f"{s}.{k}" for s, ks in RESUMABLE_CHANGES.items() for k in sorted(ks))
                raise CliError(f"{run} holds a loop run with other settings ({', '.join(diffs)}): restart it with "
                               f"the same ones (only {free} may change), or choose another loop.out")
            self.log(f"resuming the run in {run}")
        self.check_stages()
        if cfg.reward.kind == "python":
            self.reward_source()  # imports it: a wrong name fails now, not after the first sampling
        if cfg.eval.metric:
            self._metric_function()

        def prepare() -> None:
            if (run / "pool.jsonl").is_file():
                return
            render = self._prompt_check()
            pool = read_prompts(Path(cfg.prompts.path), render)
            if cfg.prompts.eval_path:
                held = read_prompts(Path(cfg.prompts.eval_path), render)
            else:
                pool, held = split_pool(pool, cfg.prompts.eval_size, cfg.loop.seed)
            run.mkdir(parents=True, exist_ok=True)  # only now: a mistake found above leaves no run dir behind
            if not saved.is_file():
                atomic_write(saved, json.dumps({"settings": settings}, indent=1) + "\n")
            write_jsonl(run / "eval_prompts.jsonl", held)  # first: pool.jsonl marks both written
            write_jsonl(run / "pool.jsonl", pool)
        on_main(prepare)
        self.pool = [row for _, row in read_jsonl(run / "pool.jsonl")]
        self.has_eval = next(read_jsonl(run / "eval_prompts.jsonl"), None) is not None

    def _prompt_check(self) -> Callable[[str | list[dict]], None]:
        """A check of one prompt as the sample stage will render it: the policy's template accepts its roles and
        it leaves sample.max_new_tokens of the policy's context (ValueError otherwise)."""
        cfg = self.cfg
        try:
            tokenizer = load_tokenizer(cfg.policy.path)
            context = from_hf_config(Path(cfg.policy.path) / "config.json").max_position_embeddings
        except (OSError, ValueError) as e:
            raise CliError(f"policy.path {cfg.policy.path}: {e}") from None

        def check(prompt) -> None:
            n = len(render_prompt(tokenizer, cfg.policy.template, as_messages(prompt, cfg.policy.system or None)))
            if n + cfg.sample.max_new_tokens > context:
                raise ValueError(f"the prompt is {n} tokens in the {cfg.policy.template} template; with "
                                 f"sample.max_new_tokens {cfg.sample.max_new_tokens} that exceeds the policy's "
                                 f"context of {context}")
        return check

    def policy(self, k: int) -> Path:
        """π_k: the starting policy, or the model round k−1 trained."""
        return Path(self.cfg.policy.path) if k == 0 else self.run_dir / f"round_{k - 1}" / "train" / "final"

    def _stage(self, k: int, name: str, artifact: Path, make: Callable[[], None]) -> None:
        """Run make() unless artifact exists; then report the stage done."""
        done = artifact.exists()
        distributed.barrier()  # every rank has looked before any writes: all take the same branch
        if done:
            self.log(f"round {k} · {name}: done already ({artifact})")
        else:
            self.log(f"round {k} · {name}")
            began = time.perf_counter()
            distributed.doing(f"round {k} · {name}")
            make()
            distributed.barrier()
            self.log(f"round {k} · {name}: {time.perf_counter() - began:.1f} s -> {artifact}")
        self.after_stage(k, name)

    def _sample_argv(self, k: int, prompts: Path, out: Path, n: int, temperature: float, seed: int) -> list[str]:
        cfg, s = self.cfg, self.cfg.sample
        argv = ["--model", str(self.policy(k)), "--prompts", str(prompts), "--out", str(out),
                "--template", cfg.policy.template, "-n", str(n), "--max-new-tokens", str(s.max_new_tokens),
                "--temperature", str(temperature), "--top-k", str(s.top_k), "--top-p", str(s.top_p),
                "--seed", str(seed), "--batch-size", str(s.batch_size), "--device", self.device.type, "--resume"]
        return argv + (["--system", cfg.policy.system] if cfg.policy.system else [])

    def _score_argv(self, samples: Path, out: Path) -> list[str]:
        r = self.cfg.reward
        argv = ["--samples", str(samples), "--out", str(out), "--policy", r.policy,
                "--policy-template", r.policy_template, "--normalize", r.normalize, "--beta", str(r.beta),
                "--batch-tokens", str(r.batch_tokens), "--device", self.device.type, "--resume"]
        argv += ["--reference", r.reference, "--reference-template", r.reference_template] if r.reference \
            else ["--reference-free"]
        argv += ["--sampler-end-ids", *map(str, r.sampler_end_ids)] if r.sampler_end_ids else []
        return argv + (["--fsdp"] if r.fsdp else [])

    @property
    def eval_temperature(self) -> float:
        e = self.cfg.eval
        return e.temperature if e.temperature >= 0 else self.cfg.sample.temperature

    def check_stages(self) -> None:
        """Every setting the sample, score and train stages will read, checked now by the stages' own rules (their
        parsers, score.py's opening of the reward models, the trainer's of the policy), so a mistake is found
        before any work."""
        cfg, run = self.cfg, self.run_dir
        checks = [("sample", lambda: sample_stage.parse_args(self._sample_argv(
                      0, run / "prompts.jsonl", run / "samples.jsonl", cfg.sample.n, cfg.sample.temperature, 0))),
                  ("eval sample", lambda: sample_stage.parse_args(self._sample_argv(
                      0, run / "prompts.jsonl", run / "samples.jsonl", cfg.eval.n, self.eval_temperature, 0)))]
        if cfg.reward.kind == "log-ratio":
            checks.append(("score", lambda: score_stage.open_scorers(score_stage.parse_args(
                self._score_argv(run / "samples.jsonl", run / "scores.jsonl")))))
        checks.append(("train", lambda: open_policy(round_train_config(cfg, 0, Path(cfg.policy.path),
                                                                       run / "train.jsonl", 1))))
        for name, check in checks:
            try:
                check()
            except CliError as e:
                raise CliError(f"the {name} stage refuses these settings: {e}") from None

    def _sample(self, k: int, prompts: Path, out: Path, n: int, temperature: float, seed: int) -> None:
        self._run_stage(sample_stage, self._sample_argv(k, prompts, out, n, temperature, seed))

    def _score(self, samples: Path, out: Path) -> None:
        r = self.cfg.reward
        if r.kind == "log-ratio":  # score.py itself: resumable per forward, torchrun, FSDP for big reward models
            self._run_stage(score_stage, self._score_argv(samples, out))
        else:  # a ranker or a user's function: on rank 0, on every row at once
            def score() -> None:
                rows = [row for _, row in read_jsonl(samples)]
                name = r.function if r.kind == "python" else f"pairrm:{r.path}"
                try:
                    rows = score_rows(self.reward_source(), rows, name)
                except ValueError as e:
                    raise CliError(str(e)) from None
                write_jsonl(out, rows)
            on_main(score)

    def reward_source(self):
        """The [reward] source for kinds other than log-ratio (which runs as score.py); a Python function is
        imported once."""
        r = self.cfg.reward
        if self._python_reward is not None:
            return self._python_reward
        options = {"function": r.function} if r.kind == "python" else {"path": r.path, "device": self.device}
        try:
            source = reward_source(r.kind, options)
        except (OSError, ValueError) as e:
            raise CliError(f"reward: {e}") from None
        if r.kind == "python":
            self._python_reward = source
        return source

    def _run_stage(self, stage, argv: list[str]) -> None:
        """A stage command (sample.py, score.py) in this process, on this process group; its command line is
        printed first."""
        name = stage.__name__.rsplit(".", 1)[1]
        self.log("  python " + shlex.join([f"{name}.py", *argv]))
        stage.run(stage.parse_args(argv), self.rank, self.world, self.device)

    def _metric_function(self) -> Callable:
        """The eval.metric function (imported once)."""
        if self._metric_fn is None:
            try:
                self._metric_fn = load_function(self.cfg.eval.metric)
            except ValueError as e:
                raise CliError(f"eval.metric: {e}") from None
        return self._metric_fn

    def _metric(self, rows: list[dict]) -> list[list[float]] | None:
        if not self.cfg.eval.metric:
            return None
        try:
            return call_source(self._metric_function(), rows, self.cfg.eval.metric)
        except ValueError as e:
            raise CliError(f"eval.metric: {e}") from None

    # -- one round --------------------------------------------------------------------------------------------
    def evaluate(self, k: int) -> dict:
        """Round k up to its metrics: draw prompts, sample and score them, sample and score the held-out prompts,
        measure π_k. Returns the metrics."""
        cfg, d = self.cfg, self.run_dir / f"round_{k}"
        if self.main:
            d.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        seed = cfg.loop.seed * 1000 + k
        self._stage(k, "prompts", d / "prompts.jsonl", lambda: on_main(lambda: write_jsonl(
            d / "prompts.jsonl", draw_prompts(self.pool, cfg.prompts.per_round, cfg.prompts.by_source,
                                              cfg.loop.seed, k))))
        self._stage(k, "sample", d / "samples.jsonl", lambda: self._sample(
            k, d / "prompts.jsonl", d / "samples.jsonl", cfg.sample.n, cfg.sample.temperature, seed))
        self._stage(k, "score", d / "scores.jsonl", lambda: self._score(d / "samples.jsonl", d / "scores.jsonl"))
        if self.has_eval:
            self._stage(k, "eval sample", d / "eval_samples.jsonl", lambda: self._sample(
                k, self.run_dir / "eval_prompts.jsonl", d / "eval_samples.jsonl", cfg.eval.n, self.eval_temperature,
                seed + 500))
            self._stage(k, "eval score", d / "eval_scores.jsonl", lambda: self._score(
                d / "eval_samples.jsonl", d / "eval_scores.jsonl"))

        def metrics() -> None:
            scores = [row for _, row in read_jsonl(d / "scores.jsonl")]
            evals = [row for _, row in read_jsonl(d / "eval_scores.jsonl")] if self.has_eval else []
            m = round_metrics(k, scores, evals, self._metric(evals) if evals else None)
            m["policy"] = str(self.policy(k))
            atomic_write(d / "metrics.json", json.dumps(m, indent=1) + "\n")
        self._stage(k, "metrics", d / "metrics.json", lambda: on_main(metrics))
        return json.loads((d / "metrics.json").read_text())

    def improve(self, k: int) -> dict:
        """Round k's selection and training (π_k → π_{k+1}); returns the selection counts."""
        cfg, d = self.cfg, self.run_dir / f"round_{k}"

        def select() -> None:
            scores = [row for _, row in read_jsonl(d / "scores.jsonl")]
            s = cfg.select
            if cfg.loop.recipe == "rejection-sampling":
                rows, stats = select_best(scores, s.keep_truncated, cfg.policy.system)
            else:
                rows, stats = select_pairs(scores, s.keep_truncated, s.min_margin, cfg.policy.system)
            if not rows:
                raise CliError(f"round {k}: no prompt of {d / 'scores.jsonl'} gave a training row ({stats}); "
                               f"all samples empty, truncated or tied? (raise sample.max_new_tokens)")
            atomic_write(d / "selection.json", json.dumps(stats) + "\n")
            write_jsonl(d / "train.jsonl", rows)  # last: its existence marks the stage done
        self._stage(k, "select", d / "train.jsonl", lambda: on_main(select))

        def train_round() -> None:
            rows = sum(1 for _ in read_jsonl(d / "train.jsonl"))
            tcfg = round_train_config(cfg, k, self.policy(k), d / "train.jsonl", rows)
            tcfg.train.resume = latest_checkpoint(Path(tcfg.train.out)) is not None
            check_config(tcfg)
            if not train(tcfg, self.rank, self.world, self.device)["final"]:  # train.stop_after ended it early
                raise CliError(f"round {k}: training stopped before its last step (train.stop_after); run the same "
                               f"command again to continue it")
        self._stage(k, "train", d / "train" / "final", train_round)
        if self.main and not cfg.loop.keep_checkpoints:  # final/ is in place: the optimizer state is not needed
            shutil.rmtree(d / "train" / "checkpoints", ignore_errors=True)  # (also what a kill before this left)
        return json.loads((d / "selection.json").read_text())

    # -- all rounds -------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Every round; returns the summary {"recipe", "rounds": [metrics...], "best": {"round", "policy"}}."""
        cfg = self.cfg
        self.start()
        rounds: list[dict] = []
        best, since_best = None, 0
        # PairRM's scores are relative to the other samples of a prompt (they sum to 0), so a batch mean compares
        # nothing across rounds: then every round runs, the result is the last policy, and no round is spent
        # only measuring it.
        relative = cfg.reward.kind == "pairrm"
        summary = None
        for k in range(cfg.loop.rounds + 1):
            if relative and k == cfg.loop.rounds:
                best = {"round": k, "policy": str(self.policy(k))}
                summary = self.write_summary(rounds, best)
                break
            m = self.evaluate(k)
            if best is None or relative or m["batch_reward"] > best["batch_reward"]:
                best, since_best = m, 0
            else:
                since_best += 1
            stop = k == cfg.loop.rounds
            if not stop and cfg.loop.patience and not relative and since_best >= cfg.loop.patience:
                self.log(f"round {k}: no higher batch reward for {since_best} round(s) (loop.patience "
                         f"{cfg.loop.patience}); stopping")
                stop = True
            if not stop:
                m["selected"] = self.improve(k)["selected"]
            rounds.append(m)
            summary = self.write_summary(rounds, best)
            if self.main:
                print(table(rounds), file=sys.stderr, flush=True)
            if stop:
                break
        # Round k's metrics describe π_k, the policy round k starts from: round_{k-1}'s training made it.
        why = "the last" if relative else f"the highest batch reward, {best['batch_reward']:.4g}"
        made = "the starting policy" if best["round"] == 0 else f"trained in round {best['round'] - 1}"
        self.log(f"best policy: π_{best['round']} ({why}; {made}): {best['policy']}")
        self.log(f"summary: {self.run_dir / 'summary.json'}, {self.run_dir / 'summary.png'}, and the link "
                 f"{self.run_dir / 'best'} to the best policy")
        return summary

    def write_summary(self, rounds: list[dict], best: dict) -> dict:
        """summary.json, summary.png and the `best` link in the run dir (rank 0; atomically)."""
        summary = {"recipe": self.cfg.loop.recipe, "rounds": rounds,
                   "best": {"round": best["round"], "policy": best["policy"]}}
        if self.main:
            run = self.run_dir
            atomic_write(run / "summary.json", json.dumps(summary, indent=1) + "\n")
            if rounds:
                plot(rounds, run / "summary.png", f"{self.cfg.loop.recipe}: {run}")
            link, tmp = run / "best", run / ".best.tmp"
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            target = Path(best["policy"])
            os.symlink(os.path.relpath(target.resolve(), run.resolve()), tmp)
            os.replace(tmp, link)
        distributed.barrier()
        return summary


def run_loop(cfg: LoopConfig, rank: int = 0, world: int = 1, device: torch.device | None = None,
             after_stage: Callable[[int, str], None] | None = None) -> dict:
    """Run (or resume) the loop cfg describes, owning its run dir meanwhile (cli.run_lock); returns the summary."""
    with run_lock(cfg.run_dir, "loop.out", make_parent=True):
        return Loop(cfg, rank, world, device, after_stage).run()
