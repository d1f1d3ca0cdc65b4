"""Everything an alignment loop does before round 0 (train.py with a config that has a [loop] table):

- its settings: the loop's own tables and those of its stages (sample.py's [sample], score.py's [reward],
  select.py's [select], evaluate.py's [eval] (with compare.py's judge), the trainer's [data] (examples.py),
  [train], [dpo] (train.py)), read and checked;
- every stage's settings checked by the stage's own rules, and every prompt rendered as the sample stage will,
  so a mistake is found before any work (not after round 0's sampling, hours into a 7B run);
- the run dir: loop.json (the settings a restart must repeat), pool.jsonl and eval_prompts.jsonl.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import json

from minalign import compare as compare_stage
from minalign import sample as sample_stage
from minalign import score as score_stage
from minalign.chat import TEMPLATES
from minalign.checkpoint import require_dir
from minalign.data import atomic_write, read_jsonl, write_jsonl
from minalign.errors import ConfigError, MinalignError, RunError
from minalign.evaluate import EvalSection
from minalign.examples import DataSection
from minalign.logratio import NORMALIZE
from minalign.prompts import split_pool
from minalign.report import ReportConfig
from minalign.rewards import REWARD_KINDS, load_function, parse_spec
from minalign.rows import read_prompts
from minalign.runs import changed_settings, on_main
from minalign.sample import SampleConfig, SampleSection
from minalign.score import RewardSection
from minalign.select import SelectSection
from minalign.settings import read_settings
from minalign.train import MAX_SEED, DPOSection, ModelSection, TrainConfig, TrainSection, check_config, open_policy

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
class LoopConfig:
    loop: LoopSection = field(default_factory=LoopSection)
    policy: PolicySection = field(default_factory=PolicySection)
    prompts: PromptsSection = field(default_factory=PromptsSection)
    sample: SampleSection = field(default_factory=SampleSection)  # sample.py's (n, temperature, ...)
    eval: EvalSection = field(default_factory=EvalSection)
    reward: RewardSection = field(default_factory=RewardSection)  # score.py's
    select: SelectSection = field(default_factory=SelectSection)
    data: DataSection = field(default_factory=DataSection)  # the trainer's (data.path is set each round)
    train: TrainSection = field(default_factory=TrainSection)  # the trainer's (mode, out, steps set each round)
    dpo: DPOSection = field(default_factory=DPOSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.loop.out.replace("{recipe}", self.loop.recipe))


def load_loop_config(source: str | dict | None, overrides: list[tuple[str, str]] = ()) -> LoopConfig:
    """A LoopConfig from a TOML file (or its tables) and `section.key value` overrides, checked (a ConfigError
    naming the problem)."""
    cfg = read_settings(LoopConfig(), source, overrides)
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
        "reward.token_logprobs is for a log-ratio reward (the others have no per-token terms)":
            r.token_logprobs and r.kind != "log-ratio",
        f"reward.normalize must be one of {NORMALIZE}": r.normalize not in NORMALIZE,
        # reward / tokens is a per-token mean only for a sum of per-token terms (a PairRM or Python score of
        # either sign would favour long answers when negative and short ones when positive)
        "select.per_token ranks iterative-dpo's samples by the per-token log ratio: it needs reward.kind log-ratio "
        "with reward.normalize sum": cfg.select.per_token and (lp.recipe != "iterative-dpo" or r.kind != "log-ratio"
                                                               or r.normalize != "sum"),
    }
    bad = [msg for msg, wrong in problems.items() if wrong]
    if bad:
        raise ConfigError("; ".join(bad))
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
PATHS = {"loop": ["out"], "policy": ["path"], "prompts": ["path", "eval_path"], "reward": ["policy", "reference", "path"]}


def fixed_settings(cfg: LoopConfig) -> dict:
    """The settings a restart must repeat (loop.json): all but RESUMABLE_CHANGES and OVERWRITTEN, with paths made
    absolute."""
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


# ------------------------------------------------------------------------------------------------- the run dir

def sample_config(cfg: LoopConfig, policy: Path, prompts: Path, out: Path, n: int, temperature: float,
                  seed: int, device: str) -> SampleConfig:
    """The sample stage's config for a policy on a prompts file, resuming whatever a killed loop left."""
    return SampleConfig(model=str(policy), prompts=str(prompts), out=str(out), template=cfg.policy.template,
                        system=cfg.policy.system or None,
                        sample=dataclasses.replace(cfg.sample, n=n, temperature=temperature), seed=seed,
                        device=device, resume=True)


def eval_temperature(cfg: LoopConfig) -> float:
    return cfg.eval.temperature if cfg.eval.temperature >= 0 else cfg.sample.temperature


def report_config(cfg: LoopConfig, k: int, policy: Path) -> ReportConfig:
    """Round k's audit report: its scores, what selection kept (once it ran), its metrics, eval.metric as the
    ground truth, and π_k's tokenizer for the token ids."""
    d = cfg.run_dir / f"round_{k}"
    return ReportConfig(scores=str(d / "scores.jsonl"), out=str(d / "report.html"), tokenizer=str(policy),
                        train=str(d / "train.jsonl") if (d / "train.jsonl").exists() else None,
                        metrics=str(d / "metrics.json"), metric=cfg.eval.metric or None, metric_optional=True,
                        resume=True)


def compare_config(cfg: LoopConfig, k: int, device: str) -> compare_stage.CompareConfig:
    """Round k's comparison of π_k's held-out responses with π_0's, by eval.judge; by default the loop's own
    reward: PairRM on the samples, any other reward on the scores it gave them already (the same numbers, with no
    model run again)."""
    judge = cfg.eval.judge or (cfg.reward.spec() if cfg.reward.kind == "pairrm" else "rewards")
    name = "eval_scores.jsonl" if judge == "rewards" else "eval_samples.jsonl"
    run = cfg.run_dir
    return compare_stage.CompareConfig(candidate=str(run / f"round_{k}" / name), baseline=str(run / "round_0" / name),
                                       judge=judge, out=str(run / f"round_{k}" / "compare.json"), device=device,
                                       resume=True)


def check_stages(cfg: LoopConfig, device: str) -> None:
    """Every setting the sample, score and train stages will read, checked now by the stages' own rules (their
    config checks, score.py's opening of the reward models or import of the reward function, the trainer's
    opening of the policy), so a mistake is found before any work."""
    run, policy = cfg.run_dir, Path(cfg.policy.path)
    score_cfg = cfg.reward.stage_config(run / "samples.jsonl", run / "scores.jsonl", device)

    def score() -> None:
        score_stage.check_config(score_cfg)
        if cfg.reward.kind == "log-ratio":
            score_stage.open_scorers(score_cfg)
        elif cfg.reward.kind == "python":
            load_function(cfg.reward.function)  # imports it: a wrong name fails now, not after the first sampling

    def judge() -> None:
        spec = compare_config(cfg, 1, device).judge
        compare_stage.check_judge(spec, "eval.judge")
        if spec == "rewards":
            return
        kind, options = parse_spec(spec.removeprefix("pairwise:"))
        if kind == "python":
            load_function(spec.removeprefix("pairwise:"))  # imports it: a wrong name fails now
        for key in ("path", "policy", "reference"):  # pairrm:DIR, log-ratio:policy=DIR,reference=DIR
            if options.get(key):
                require_dir(options[key], f"eval.judge {spec}:")
    checks = [("sample", lambda: sample_stage.check_config(sample_config(
                  cfg, policy, run / "prompts.jsonl", run / "samples.jsonl", cfg.sample.n, cfg.sample.temperature,
                  0, device))),
              ("eval sample", lambda: sample_stage.check_config(sample_config(
                  cfg, policy, run / "prompts.jsonl", run / "samples.jsonl", cfg.eval.n, eval_temperature(cfg), 0,
                  device))),
              ("score", score), ("compare", judge),
              ("train", lambda: open_policy(round_train_config(cfg, 0, policy, run / "train.jsonl", 1)))]
    for name, check in checks:
        try:
            check()
        except MinalignError as e:
            raise ConfigError(f"the {name} stage refuses these settings: {e}") from None


def start_run(cfg: LoopConfig, world: int, device: str, log) -> tuple[list[dict], bool]:
    """Check everything that can be checked before any work (paths, settings against a run being restarted, every
    stage's settings, every prompt rendered in the policy's template, the metric function, the batch split); then
    write loop.json and the pool and held-out prompt files (rank 0). Returns (the pool, whether there are held-out
    prompts)."""
    run = cfg.run_dir
    for what, p in [("policy.path", cfg.policy.path), ("prompts.path", cfg.prompts.path),
                    ("prompts.eval_path", cfg.prompts.eval_path)]:
        if p and not Path(p).exists():
            raise ConfigError(f"{what} {p}: no such file or directory")
    t = cfg.train
    if t.batch_size % (world * t.micro_batch_size):
        raise ConfigError(f"train.batch_size {t.batch_size} must be a multiple of world size {world} × "
                          f"train.micro_batch_size {t.micro_batch_size}")
    settings = fixed_settings(cfg)
    saved = run / "loop.json"
    if saved.is_file():
        then = json.loads(saved.read_text())["settings"]
        then.pop("demo", None)  # runs before the demo's settings left the loop config recorded them here too
        # A setting added since the run began behaved as its default then.
        defaults = fixed_settings(LoopConfig())
        for section, keys in settings.items():
            for key in set(keys) - set(then.get(section, {})):
                then.setdefault(section, {})[key] = defaults[section][key]
        diffs = changed_settings(then, settings)
        if diffs:
            free = ", ".join(f"{s}.{k}" for s, ks in RESUMABLE_CHANGES.items() for k in sorted(ks))
            raise RunError(f"{run} holds a loop run with other settings ({', '.join(diffs)}): restart it with "
                           f"the same ones (only {free} may change), or choose another loop.out")
        log(f"resuming the run in {run}")
    check_stages(cfg, device)
    if cfg.eval.metric:  # imports it: a wrong name fails now, not after the first round's sampling
        try:
            load_function(cfg.eval.metric)
        except ValueError as e:
            raise ConfigError(f"eval.metric: {e}") from None

    def prepare() -> None:
        if (run / "pool.jsonl").is_file():
            return
        config, tokenizer, _ = sample_stage.open_model(sample_config(
            cfg, Path(cfg.policy.path), Path(cfg.prompts.path), run / "samples.jsonl", cfg.sample.n, 1.0, 0, device))
        render = sample_stage.prompt_renderer(tokenizer, cfg.policy.template, cfg.policy.system or None,
                                              cfg.sample.max_new_tokens, config.max_position_embeddings,
                                              budget="sample.max_new_tokens", model="the policy's")
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
    pool = [row for _, row in read_jsonl(run / "pool.jsonl")]
    return pool, next(read_jsonl(run / "eval_prompts.jsonl"), None) is not None
