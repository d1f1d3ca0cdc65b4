"""The CPU demo's task and setup: arithmetic questions with a ground truth, a tokenizer, a noisy base model and a
clean "instruct" teacher tuned from it: what the rejection-sampling loop needs, built in ~30 s on 2 CPU cores.

Merlinite-7B-pt's finding: a policy improves by rejection sampling from itself (N samples per prompt, keep the one
with the highest reward, SFT on those, repeat) with the reward

    r(x, y) = log π_teacher(y | x) − log π_base(y | x)

of an off-the-shelf pair, Mixtral-8x7B-Instruct over Mixtral-8x7B: no reward model trained, no labels. The demo
plays that out in miniature on a task with a ground truth, so what the reward picks can be checked:

    task     "What is 7 plus 5?" → "12". Sources add, sub, mul ("plus", "minus", "times"), operands 0..max_operand
             (a difference may be negative). The answer follows from the question text, so `accuracy` needs no
             labels file.
    base     a tiny Mistral from random weights, SFT on noisy answers (noisy.jsonl): every question answered
             noisy_answers times, a share p_correct of them right, the others the right answer ± 1, 2 or 3.
    teacher  the base, SFT on the right answers (clean.jsonl), as Mixtral-Instruct is Mixtral tuned: the same
             knowledge, stated with confidence.
    reward   a right answer gets ≈ log(0.99 / 0.35) ≈ +1 (the teacher is sure of it, the base is not); a near miss
             ≈ −8 (the base gives it ~0.1, the teacher next to nothing). Seed 0, eval.jsonl: means +0.98 and −8.2,
             and the right answer beats all six near misses on every prompt, with no label used.

Measured with the defaults (seeds 0-2): at temperature 1 the base is right 0.27-0.38 of the time on eval.jsonl, the
teacher 0.97-0.99. Rounds of best-of-8 over the 240 pool prompts (SFT 4 epochs, lr 1e-3, from the previous
round's policy) raise the round's mean reward and accuracy every round (seed 0: −4.24 / 0.37 → −1.55 / 0.64 →
−0.58 / 0.75) and held-out accuracy with them (0.38 → 0.55 → 0.64).

Why it is built this way:
- Wrong answers are near misses, not random strings: trained on them, the base holds the right answer as the mode
  of a spread over neighbouring numbers (blurrier than its data: right ~0.35 of the time, not p_correct), and
  "narrow the spread" is one direction shared by every question. Rejection sampling on the pool moves the policy
  along it, so held-out prompts improve too: the generalisation the Merlinite recipe relies on.
- Each question gets exactly round(p_correct · noisy_answers) right answers and the offsets in turn (each as often
  as the others), not random draws: the noise is the same for every question, so results vary little by seed.
- Base and teacher see every question, the pool's and the held-out ones: they stand for pretrained models that
  know the world. What is held out is held out from the alignment rounds: eval.jsonl measures whether gains on the
  sampled pool carry over to prompts never sampled.
- The tokenizer is trained here like Mistral's (sentencepiece BPE, <unk>=0, <s>=1, </s>=2, digits split) on the
  task's own text: 64 pieces ("INST", "▁What", "▁times" among them) and a cheap lm_head. The template is "mistral"
  (`<s>[INST] q [/INST]a</s>`) for the policy and both reward models: one tokenizer and one rendering, so the log
  ratio compares like with like.
- Both models are trained with minalign's trainer (SFT), the code a real run uses; a model's 3000 + 300 steps
  (batch 32) are most of the setup's time.

Artifacts in `out`, each written atomically (a temp file or dir, then os.replace: a kill leaves none half-written)
and skipped by a rerun when it exists: demo.json (the settings; a rerun with others is refused), prompts.jsonl (the
alignment pool) and eval.jsonl (held out), rows {"id", "prompt", "source"}; tokenizer/; noisy.jsonl and clean.jsonl
(the SFT rows of base and teacher, {"prompt", "response"}); base/ and teacher/ (HF checkpoint dirs with the
tokenizer files). Base and teacher train in base.run/ and teacher.run/ (the trainer's run dirs, removed once the
model is in place) with a checkpoint every SAVE_EVERY steps: a rerun after a kill resumes the model's training
from its last checkpoint, and the trainer's exact resume makes the result byte-identical to an uninterrupted build.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

import minalign
from minalign.data import atomic_write, file_sha256, read_jsonl, write_jsonl
from minalign.errors import ConfigError, RunError
from minalign.examples import DataSection
from minalign.runs import changed_settings, run_lock
from minalign.train import ModelSection, TrainConfig, TrainSection, check_config, train
from minalign.train_state import latest_checkpoint, run_settings

TEMPLATE = "mistral"  # chat template of the policy and of both reward models
OPERATIONS = {"add": ("plus", lambda a, b: a + b), "sub": ("minus", lambda a, b: a - b),
              "mul": ("times", lambda a, b: a * b)}  # source -> (its word in the question, the ground truth)
OFFSETS = (1, -1, 2, -2, 3, -3)  # a wrong answer is the right one plus one of these
QUESTION = re.compile(r"What is (\d+) (plus|minus|times) (\d+)\?")
SAVE_EVERY = 100  # trainer checkpoints of base and teacher: a kill loses at most this many steps (~1 s)
MAX_LENGTH = 64  # the models' context; a demo row takes ~20 tokens, the answer 3-5 of them ("▁", "-", digits, "</s>")


@dataclass
class DemoSection:
    """The [demo] table of a loop config: where the setup goes, and how the task and its two models are made."""

    out: str = "runs/demo/setup"  # where build() writes its artifacts
    seed: int = 0  # of the split, the noisy answers, the initial weights and the training order
    max_operand: int = 9  # operands are 0..max_operand: 3·(max_operand + 1)² questions in all
    eval_per_source: int = 20  # held-out questions per source (eval.jsonl); the rest are the pool (prompts.jsonl)
    noisy_answers: int = 12  # the base's SFT answers per question (noisy.jsonl)
    p_correct: float = 0.5  # the share of them that is right (the base, blurring neighbours, is right ~0.35 at T=1)
    vocab_size: int = 64  # sentencepiece pieces at most (fewer if the text has fewer to offer)
    hidden_size: int = 64  # of the tiny Mistral (4 query heads over 2 key/value heads): a multiple of 8
    intermediate_size: int = 128  # of its MLP
    num_layers: int = 2  # its decoder layers
    batch_size: int = 32  # rows per optimizer step when training base and teacher (one forward each on a CPU)
    base_steps: int = 3000  # SFT steps of the base on noisy.jsonl (~27 epochs at the defaults)
    base_lr: float = 3e-3  # its peak learning rate (linear warmup over 5% of the steps, then cosine to 10%)
    teacher_steps: int = 300  # SFT steps of the teacher, from the base, on clean.jsonl (~32 epochs)
    teacher_lr: float = 2e-3  # its peak learning rate


def check(d: DemoSection) -> None:
    """ConfigError naming each demo.<key> whose value is out of range."""
    questions = (d.max_operand + 1) ** 2  # per source
    problems = {"demo.out is required": not d.out,
                "demo.max_operand must be >= 1": d.max_operand < 1,
                f"demo.eval_per_source must be in 1..{questions - 1} (questions per source, minus one for the pool)":
                    not 1 <= d.eval_per_source < questions,
                f"demo.p_correct {d.p_correct} · noisy_answers {d.noisy_answers} must round to "
                f"1..{d.noisy_answers - 1} (some answers right, some wrong)":
                    not 0 < round(d.p_correct * d.noisy_answers) < d.noisy_answers,
                "demo.noisy_answers, vocab_size, intermediate_size, num_layers, batch_size, base_steps, "
                "teacher_steps must be >= 1": min(d.noisy_answers, d.vocab_size, d.intermediate_size, d.num_layers,
                                                  d.batch_size, d.base_steps, d.teacher_steps) < 1,
                "demo.hidden_size must be a positive multiple of 8 (4 heads, an even head_dim for RoPE)":
                    d.hidden_size < 8 or d.hidden_size % 8,
                f"demo.batch_size must be at most the number of questions, {3 * questions} (the teacher's rows)":
                    d.batch_size > 3 * questions,
                "demo.base_lr and teacher_lr must be > 0": not (d.base_lr > 0 and d.teacher_lr > 0)}
    bad = [msg for msg, wrong in problems.items() if wrong]
    if bad:
        raise ConfigError("; ".join(bad))


# ------------------------------------------------------------------------------------------------------ the task

def question(source: str, a: int, b: int) -> str:
    """The prompt text of a question: "What is 7 plus 5?"."""
    return f"What is {a} {OPERATIONS[source][0]} {b}?"


def answer(prompt: str) -> int | None:
    """The ground truth of a demo question (surrounding whitespace ignored), or None if prompt is not one."""
    m = QUESTION.fullmatch(prompt.strip())
    if m is None:
        return None
    a, word, b = m.groups()
    op = next(f for w, f in OPERATIONS.values() if w == word)
    return op(int(a), int(b))


def accuracy(rows: list[dict]) -> list[list[float]]:
    """Ground-truth metric with the reward-source interface: for each samples row ({"prompt": str, "responses":
    [{"text": str, ...}, ...]}) one 1.0/0.0 per response: is its text, stripped of surrounding whitespace, the
    right answer in digits. ValueError naming the row for a prompt that is not a demo question, or for a response
    without text. No model is involved: the loop can log it beside the reward without training on it."""
    out = []
    for k, row in enumerate(rows):
        prompt = row.get("prompt")
        truth = answer(prompt) if isinstance(prompt, str) else None
        if truth is None:
            raise ValueError(f"row {k}: prompt {prompt!r} is not a demo question (\"What is A plus|minus|times B?\")")
        responses = row.get("responses")
        if not isinstance(responses, list):
            raise ValueError(f'row {k}: a samples row needs a "responses" list')
        scores = []
        for j, r in enumerate(responses):
            if not isinstance(r, dict) or not isinstance(r.get("text"), str):
                raise ValueError(f'row {k}: responses[{j}] needs a "text" string')
            scores.append(float(r["text"].strip() == str(truth)))
        out.append(scores)
    return out


def prefer_correct(comparisons: list[dict]) -> list[float]:
    """Ground-truth judge with the pairwise interface (compare.py, `--judge pairwise:minalign.demo:prefer_correct`):
    P(candidate beats baseline) = 0.5 + (right(candidate) − right(baseline)) / 2, so a tie when both or neither
    answer is right."""
    rows = [{"prompt": c["prompt"], "responses": [{"text": c["candidate"]}, {"text": c["baseline"]}]}
            for c in comparisons]
    return [0.5 + (a - b) / 2 for a, b in accuracy(rows)]


def split(d: DemoSection) -> tuple[list[dict], list[dict]]:
    """(pool, held-out) prompt rows {"id": "add-7-5", "prompt", "source": "add"}: eval_per_source random questions
    of each source are held out."""
    rng = random.Random(f"split/{d.seed}")  # a string seed: the same draw on every Python
    pool, held = [], []
    n = d.max_operand + 1
    for source in OPERATIONS:
        rows = [{"id": f"{source}-{a}-{b}", "prompt": question(source, a, b), "source": source}
                for a in range(n) for b in range(n)]
        rng.shuffle(rows)
        held += rows[:d.eval_per_source]
        pool += rows[d.eval_per_source:]
    return pool, held


def noisy_rows(questions: list[dict], d: DemoSection) -> list[dict]:
    """The base's SFT rows: each question noisy_answers times, round(p_correct · noisy_answers) of them right and
    the others right + an offset, the offsets taken in turn from a shuffled cycle (each equally often)."""
    rng = random.Random(f"noisy/{d.seed}")
    right = round(d.p_correct * d.noisy_answers)
    rows = []
    for q in questions:
        truth = answer(q["prompt"])
        offsets = [0] * right
        while len(offsets) < d.noisy_answers:
            offsets += rng.sample(OFFSETS, len(OFFSETS))
        rows += [{"prompt": q["prompt"], "response": str(truth + o)} for o in offsets[:d.noisy_answers]]
    rng.shuffle(rows)
    return rows


def clean_rows(questions: list[dict]) -> list[dict]:
    """The teacher's SFT rows: each question once, with its right answer."""
    return [{"prompt": q["prompt"], "response": str(answer(q["prompt"]))} for q in questions]


def pair_rows(questions: list[dict]) -> list[dict]:
    """DPO rows for configs/dpo_tiny.toml (not used by the demo itself): each question's right answer (chosen) over
    a near miss (rejected), the offsets taken in turn."""
    return [{"prompt": q["prompt"], "chosen": str(answer(q["prompt"])),
             "rejected": str(answer(q["prompt"]) + OFFSETS[k % len(OFFSETS)])} for k, q in enumerate(questions)]


def check_rewards(run: Path) -> list[dict]:
    """Per round of a demo loop run: of the held-out prompts where a right answer was sampled, on how many the
    top-reward sample is right, and the prompts where a wrong one got the top reward (over-optimisation)."""
    out = []
    for k in range(len(list(run.glob("round_*")))):
        path = run / f"round_{k}" / "eval_scores.jsonl"
        if not path.is_file():
            break
        rows = [row for _, row in read_jsonl(path)]
        right = accuracy(rows)
        drawn = [i for i, r in enumerate(right) if max(r) == 1.0]
        top = [max(range(len(r["responses"])), key=lambda j: r["responses"][j]["reward"]) for r in rows]
        wrong = [(rows[i]["prompt"], rows[i]["responses"][top[i]]["text"]) for i in drawn if right[i][top[i]] == 0.0]
        out.append({"round": k, "prompts": len(rows), "right_drawn": len(drawn),
                    "top_right": len(drawn) - len(wrong), "top_wrong": wrong})
    return out


# ------------------------------------------------------------------------------------------------- the pieces

def train_tokenizer(texts: list[str], vocab_size: int) -> minalign.Tokenizer:
    """A sentencepiece BPE tokenizer trained in memory like Mistral's: <unk>=0, <s>=1, </s>=2, no pad, digits
    split, whitespace kept verbatim; no byte fallback (the demo's text is a few ASCII characters, and 256 byte
    pieces would quintuple the vocabulary)."""
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=False, split_digits=True, remove_extra_whitespaces=False,
            normalization_rule_name="identity", add_dummy_prefix=True, character_coverage=1.0,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
            hard_vocab_limit=False,  # a small task (the tests') has fewer possible pieces: vocab_size is a ceiling
            num_threads=1)  # one thread: the same pieces on every machine
    except RuntimeError as e:  # e.g. fewer pieces than the text has characters
        raise ConfigError(f"demo.vocab_size {vocab_size}: sentencepiece cannot train: {e}") from None
    return minalign.Tokenizer(spm.SentencePieceProcessor(model_proto=buf.getvalue()))


def model_config(d: DemoSection, vocab_size: int) -> minalign.ModelConfig:
    """tiny-mistral at the demo's sizes; no sliding window (a demo row is shorter than any useful window)."""
    return minalign.get_config("tiny-mistral", vocab_size=vocab_size, hidden_size=d.hidden_size,
                               intermediate_size=d.intermediate_size, num_hidden_layers=d.num_layers,
                               max_position_embeddings=MAX_LENGTH, sliding_window=None)


def sft_config(init: Path, data: Path, steps: int, lr: float, d: DemoSection, run: Path) -> TrainConfig:
    """The trainer's config for SFT of checkpoint init on data in run dir `run`: resumed from its last checkpoint
    (one every SAVE_EVERY steps) when it has one."""
    cfg = TrainConfig(
        model=ModelSection(path=str(init), template=TEMPLATE),
        data=DataSection(path=str(data), max_length=MAX_LENGTH, max_prompt_length=MAX_LENGTH - 8),
        train=TrainSection(mode="sft", out=str(run), steps=steps, batch_size=d.batch_size,
                           micro_batch_size=d.batch_size,  # one forward per step: the fastest on a CPU
                           lr=lr, warmup_steps=max(1, steps // 20), min_lr_ratio=0.1, seed=d.seed,
                           log_every=max(1, steps // 4), save_every=SAVE_EVERY, keep_checkpoints=1,
                           resume=True, device="cpu"))
    check_config(cfg)
    return cfg


def sft(cfg: TrainConfig) -> Path:
    """Run (or resume) the SFT cfg describes with minalign's trainer; returns its final/ dir."""
    done = train(cfg, device=torch.device("cpu"))
    if done["stats"].truncated_prompts or done["stats"].truncated_responses:  # only a tiny demo.vocab_size can do it
        raise ConfigError(f"{cfg.data.path}: rows longer than the demo models' context of {MAX_LENGTH} tokens; raise "
                       f"demo.vocab_size")
    return done["final"]


def _resumable_step(cfg: TrainConfig, run: Path, log) -> int:
    """The step run's latest checkpoint holds, for the trainer to resume from; 0 (and run cleared) when there is
    none, or when it was written with other trainer settings than cfg's (the setup moved to another demo.out, or
    demo.py changed): the demo starts such a run over rather than have the trainer refuse it."""
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        return 0
    try:
        prev = json.loads((ckpt / "trainer_state.json").read_text())
        now = {**run_settings(cfg, 1), "data_sha256": file_sha256(Path(cfg.data.path))}
        diffs = changed_settings(prev["settings"], now)
        step, why = prev["step"], f"written with other settings: {', '.join(diffs)}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        diffs, why = ["?"], f"unreadable: {e}"
    if not diffs:
        return step
    log(f"demo: cannot resume {run} ({ckpt.name} {why}); starting it over")
    shutil.rmtree(run)
    return 0


def _settings(d: DemoSection) -> dict:
    """What the artifacts depend on: every field but out."""
    return {k: v for k, v in dataclasses.asdict(d).items() if k != "out"}


def build(d: DemoSection, log=print) -> dict[str, Path]:
    """_build (below), owning d.out meanwhile (runs.run_lock): two runs sharing a setup never build it at once."""
    with run_lock(Path(d.out), "demo.out", make_parent=True):
        return _build(d, log)


def _build(d: DemoSection, log=print) -> dict[str, Path]:
    """Build the demo's task, tokenizer and two models into d.out; return their paths:
    {"base": dir, "teacher": dir, "prompts": file, "eval": file}. Resumable: each artifact is skipped when it
    already exists; every artifact is written atomically (temp file/dir + os.replace), so a kill leaves no
    half-written one; a killed model training resumes from its last checkpoint. RunError if d.out was built with
    other settings (demo.json says which)."""
    check(d)
    out = Path(d.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "demo.json"
    if stamp.is_file():
        old = json.loads(stamp.read_text())
        diffs = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in _settings(d).items() if old.get(k) != v]
        if diffs:
            raise RunError(f"{stamp}: {out} was built with other settings ({', '.join(diffs)}); delete it or "
                           f"choose another demo.out")
    else:
        atomic_write(stamp, json.dumps(_settings(d), indent=1) + "\n")
    for tmp in out.glob(".*.tmp"):  # atomic_write's temp files of a killed build
        if tmp.is_file():
            tmp.unlink()
    paths = {"base": out / "base", "teacher": out / "teacher", "prompts": out / "prompts.jsonl",
             "eval": out / "eval.jsonl"}

    pool, held = split(d)
    for key, rows in (("prompts", pool), ("eval", held)):
        if not paths[key].is_file():
            write_jsonl(paths[key], rows)
            log(f"demo: {len(rows)} prompts -> {paths[key]}")
    questions = pool + held  # the models know every question; only the rounds' sampling is restricted to the pool
    data = {"noisy": out / "noisy.jsonl", "clean": out / "clean.jsonl", "pairs": out / "pairs.jsonl"}
    for key, rows in (("noisy", lambda: noisy_rows(questions, d)), ("clean", lambda: clean_rows(questions)),
                      ("pairs", lambda: pair_rows(pool))):
        if not data[key].is_file():
            write_jsonl(data[key], rows())
            log(f"demo: {key} {'DPO' if key == 'pairs' else 'SFT'} rows -> {data[key]}")

    tok_dir = out / "tokenizer"
    if not tok_dir.is_dir():
        # Trained on what the models will read: the prompts as the template renders them, and every answer offered.
        texts = [f"[INST] {r['prompt']} [/INST]" for _, r in read_jsonl(data["noisy"])]
        texts += [r["response"] for _, r in read_jsonl(data["noisy"])]
        tmp = out / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # a killed build's
        train_tokenizer(texts, d.vocab_size).save(tmp)
        os.replace(tmp, tok_dir)
        log(f"demo: tokenizer ({minalign.load_tokenizer(tok_dir).vocab_size} ids) -> {tok_dir}")
    tokenizer = minalign.load_tokenizer(tok_dir)

    for name, init, key, steps, lr in (("base", None, "noisy", d.base_steps, d.base_lr),
                                       ("teacher", paths["base"], "clean", d.teacher_steps, d.teacher_lr)):
        run = out / f"{name}.run"
        if paths[name].is_dir():
            shutil.rmtree(run, ignore_errors=True)  # a kill between the move of its final/ and this cleanup
            continue
        began = time.perf_counter()
        if not (run / "final").is_dir():  # else trained already, killed before the move below
            if init is None:  # the base starts from random weights, saved with the tokenizer as the trainer's input
                init = run / "init"
            cfg = sft_config(init, data[key], steps, lr, d, run)
            step = _resumable_step(cfg, run, log)
            if name == "base" and not init.is_dir():  # deterministic (seed): a killed write is simply redone
                tmp = run / ".init.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                model = minalign.Transformer(model_config(d, tokenizer.vocab_size)).init_weights(seed=d.seed)
                minalign.save_model(model, tmp)
                tokenizer.save(tmp)
                os.replace(tmp, init)
            log(f"demo: training the {name} ({steps} SFT steps on {data[key]}"
                + (f", resuming at step {step})" if step else ")"))
            sft(cfg)
        os.replace(run / "final", paths[name])
        shutil.rmtree(run)
        log(f"demo: {name} ({time.perf_counter() - began:.0f} s) -> {paths[name]}")
    return paths


if __name__ == "__main__":  # python -m minalign.demo check RUN_DIR: the README's figures of what the reward picks
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "check" or not Path(sys.argv[2]).is_dir():
        print("usage: python -m minalign.demo check RUN_DIR (e.g. runs/demo/rejection-sampling)", file=sys.stderr)
        sys.exit(2)
    found = check_rewards(Path(sys.argv[2]))
    if not found:
        print(f"python -m minalign.demo check: {sys.argv[2]} holds no round_0/eval_scores.jsonl (a loop run dir, "
              f"e.g. runs/demo/rejection-sampling)", file=sys.stderr)
        sys.exit(2)
    for r in found:
        wrong = "; ".join(f"{p!r} -> {t!r}" for p, t in r["top_wrong"])
        print(f"round {r['round']}: {r['prompts']} held-out prompts, a right answer sampled on {r['right_drawn']}, "
              f"the top-reward sample right on {r['top_right']}" + (f"; wrong at the top: {wrong}" if wrong else ""))
