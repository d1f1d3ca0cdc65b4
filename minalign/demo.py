"""The CPU demo's task and setup: arithmetic questions with a ground truth, a tokenizer, a noisy base model and a
clean "instruct" teacher tuned from it — everything the rejection-sampling loop needs, built in about a minute.

Merlinite-7B-pt's finding: a policy improves by rejection sampling from itself with the reward

    r(x, y) = log π_teacher(y | x) − log π_base(y | x)

of an off-the-shelf pair (Mixtral-8x7B-Instruct over Mixtral-8x7B), with no reward model trained and no labels.
The demo plays that out in miniature on a task whose ground truth is known, so the reward's choices can be checked:

    task     "What is 7 plus 5?" → "12": sources add, sub, mul ("plus", "minus", "times"), operands
             0..max_operand. The answer follows from the question text alone, so `accuracy` needs no labels file.
    base     a tiny Mistral from random weights, SFT on noisy answers: each question answered noisy_answers times,
             a share p_correct of them right and the rest the right answer ± 1, 2 or 3, each offset equally often.
    teacher  the base, SFT on the right answers (Mixtral-Instruct is Mixtral tuned): the same knowledge, sharper.
    reward   for a right answer ≈ log(q / p_correct) > 0 (q: the teacher's probability of it, near 1); for a wrong
             one ≈ log(q' · 6 / (1 − p_correct)) < 0 (q' small): right answers win without any label.

Why it is built this way:
- Wrong answers are near misses in fixed proportions, not random strings: the base then holds the answer as the
  mode of a spread around it, and "narrow the spread" is one direction shared by all questions. Rejection sampling
  on the pool's prompts moves the policy along it, so held-out prompts improve too — the generalisation the
  Merlinite recipe relies on (it aligns on one prompt set and is judged on others).
- Each question's noisy answers have exactly round(p_correct · noisy_answers) right ones and the wrong offsets in
  turn: the base's per-question odds are then p_correct for every question, not a binomial draw around it, which
  keeps the demo's outcome steady from seed to seed.
- Base and teacher see every question (the pool's and the held-out ones): they stand for pretrained models that
  know the world. What is held out is held out from the alignment rounds: eval.jsonl measures whether the gains on
  the sampled pool carry over to prompts never sampled.
- The tokenizer is trained here, like Mistral's (sentencepiece BPE, <unk>=0, <s>=1, </s>=2, digits split), on the
  task's own text, so its vocabulary is small (a 64-piece one makes "[INST]", " What", " times" single pieces) and
  the lm_head cheap. The chat template is "mistral" (`<s>[INST] q [/INST]a</s>`) for the policy and both reward
  models: they share one tokenizer and one prompt rendering, so the log ratio compares like with like.
- Both models are trained by minalign's own trainer (SFT, the same code a real run uses).

Artifacts in `out` (each written atomically: a temp file or dir, then os.replace; a kill leaves none half-written,
and a rerun skips what exists): demo.json (the settings, checked on a rerun), prompts.jsonl (the alignment pool) and
eval.jsonl (held out), rows {"id", "prompt", "source"}; tokenizer/; noisy.jsonl and clean.jsonl (the SFT rows of
base and teacher, {"prompt", "response"}); base/ and teacher/ (HF checkpoint dirs with the tokenizer files).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

import minalign
from minalign.cli import CliError
from minalign.data import atomic_write, read_jsonl, write_jsonl
from minalign.trainer import DataSection, ModelSection, TrainConfig, TrainSection, check_config, train

TEMPLATE = "mistral"  # chat template of the policy and of both reward models
OPERATIONS = {"add": ("plus", lambda a, b: a + b), "sub": ("minus", lambda a, b: a - b),
              "mul": ("times", lambda a, b: a * b)}  # source -> (word in the question, the ground truth)
OFFSETS = (1, -1, 2, -2, 3, -3)  # a wrong answer is the right one plus one of these
QUESTION = re.compile(r"What is (\d+) (plus|minus|times) (\d+)\?")
MAX_ANSWER_TOKENS = 4  # "▁-", two digits, "</s>" (or "▁", two digits, "</s>"): max_new_tokens must allow this
MAX_LENGTH = 32  # prompt + answer tokens of any demo row (~20), with room to spare


@dataclass
class DemoSection:
    out: str = "runs/demo/setup"  # where build() writes its artifacts
    seed: int = 0  # of the data split, the noisy answers, the weights and the training order
    max_operand: int = 9  # operands are 0..max_operand: 3·(max_operand + 1)² questions in all
    eval_per_source: int = 20  # held-out questions per source (eval.jsonl); the rest are the pool (prompts.jsonl)
    noisy_answers: int = 10  # the base's answers per question
    p_correct: float = 0.4  # the share of them that is right; the base's accuracy at temperature 1
    vocab_size: int = 64  # sentencepiece pieces
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    batch_size: int = 32  # rows per optimizer step, base and teacher
    base_steps: int = 600  # SFT steps of the base on noisy.jsonl
    base_lr: float = 3e-3
    teacher_steps: int = 150  # SFT steps of the teacher (from the base) on clean.jsonl
    teacher_lr: float = 1e-3


# ------------------------------------------------------------------------------------------------------ the task

def question(source: str, a: int, b: int) -> str:
    return f"What is {a} {OPERATIONS[source][0]} {b}?"


def answer(prompt: str) -> int | None:
    """The ground truth of a demo question, or None if prompt is not one."""
    m = QUESTION.fullmatch(prompt.strip())
    if m is None:
        return None
    a, word, b = m.groups()
    op = next(f for w, f in OPERATIONS.values() if w == word)
    return op(int(a), int(b))


def accuracy(rows: list[dict]) -> list[list[float]]:
    """Ground-truth metric with the reward-source interface: for each samples row ({"prompt": str, "responses":
    [{"text": str, ...}, ...]}) one 1.0/0.0 per response — is its text, stripped of surrounding whitespace, the
    right answer. ValueError naming the row for a prompt that is not a demo question or a response without text."""
    out = []
    for k, row in enumerate(rows):
        prompt = row.get("prompt")
        truth = answer(prompt) if isinstance(prompt, str) else None
        if truth is None:
            raise ValueError(f"row {k}: prompt {prompt!r} is not a demo question (\"What is A plus|minus|times B?\")")
        scores = []
        for j, r in enumerate(row.get("responses") or []):
            if not isinstance(r, dict) or not isinstance(r.get("text"), str):
                raise ValueError(f'row {k}: responses[{j}] needs a "text" string')
            scores.append(float(r["text"].strip() == str(truth)))
        out.append(scores)
    return out


def split(d: DemoSection) -> tuple[list[dict], list[dict]]:
    """(pool, held-out) prompt rows {"id", "prompt", "source"}: eval_per_source random questions of each source
    are held out."""
    rng = random.Random(f"split/{d.seed}")
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


# ------------------------------------------------------------------------------------------------- the pieces

def train_tokenizer(texts: list[str], vocab_size: int) -> minalign.Tokenizer:
    """A sentencepiece BPE tokenizer trained in memory like Mistral's: <unk>=0, <s>=1, </s>=2, no pad, digits
    split, whitespace kept verbatim; no byte fallback (the demo's text is a few ASCII characters, and 256 byte
    pieces would quintuple the vocabulary)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=False, split_digits=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        add_dummy_prefix=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        num_threads=1)  # one thread: the same pieces on every machine
    return minalign.Tokenizer(spm.SentencePieceProcessor(model_proto=buf.getvalue()))


def model_config(d: DemoSection, vocab_size: int) -> minalign.ModelConfig:
    """tiny-mistral at the demo's sizes; no sliding window (a demo row is shorter than any useful window)."""
    return minalign.get_config("tiny-mistral", vocab_size=vocab_size, hidden_size=d.hidden_size,
                               intermediate_size=d.intermediate_size, num_hidden_layers=d.num_layers,
                               max_position_embeddings=2 * MAX_LENGTH, sliding_window=None)


def sft(init: Path, data: Path, steps: int, lr: float, d: DemoSection, run: Path) -> Path:
    """SFT of checkpoint init on data with minalign's trainer, in run dir `run`; returns its final/ dir."""
    cfg = TrainConfig(
        model=ModelSection(path=str(init), template=TEMPLATE),
        data=DataSection(path=str(data), max_length=MAX_LENGTH, max_prompt_length=MAX_LENGTH - MAX_ANSWER_TOKENS),
        train=TrainSection(mode="sft", out=str(run), steps=steps, batch_size=d.batch_size,
                           micro_batch_size=d.batch_size,  # one forward per step: the fastest on a CPU
                           lr=lr, warmup_steps=max(1, steps // 20), min_lr_ratio=0.1, seed=d.seed,
                           log_every=max(1, steps // 4), device="cpu"))
    check_config(cfg)
    return train(cfg, device=torch.device("cpu"))["final"]


def _settings(d: DemoSection) -> dict:
    """What the artifacts depend on: every field but out."""
    return {k: v for k, v in dataclasses.asdict(d).items() if k != "out"}


def build(d: DemoSection, log=print) -> dict[str, Path]:
    """Build the demo's task, tokenizer and two models into d.out; return their paths:
    {"base": dir, "teacher": dir, "prompts": file, "eval": file}. Resumable: each artifact is skipped when it
    already exists; every artifact is written atomically (temp file/dir + os.replace), so a kill leaves no
    half-written one. CliError if d.out was built with other settings (demo.json says which)."""
    out = Path(d.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "demo.json"
    if stamp.is_file():
        old = json.loads(stamp.read_text())
        diffs = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in _settings(d).items() if old.get(k) != v]
        if diffs:
            raise CliError(f"{stamp}: {out} was built with other settings ({', '.join(diffs)}); delete it or "
                           f"choose another demo.out")
    else:
        atomic_write(stamp, json.dumps(_settings(d), indent=1) + "\n")
    paths = {"base": out / "base", "teacher": out / "teacher", "prompts": out / "prompts.jsonl",
             "eval": out / "eval.jsonl"}

    pool, held = split(d)
    for key, rows in (("prompts", pool), ("eval", held)):
        if not paths[key].is_file():
            write_jsonl(paths[key], rows)
            log(f"demo: {len(rows)} prompts -> {paths[key]}")
    questions = pool + held  # the models know every question; only the rounds' sampling is restricted to the pool
    data = {"noisy": out / "noisy.jsonl", "clean": out / "clean.jsonl"}
    for key, rows in (("noisy", lambda: noisy_rows(questions, d)), ("clean", lambda: clean_rows(questions))):
        if not data[key].is_file():
            write_jsonl(data[key], rows())
            log(f"demo: {key} SFT rows -> {data[key]}")

    tok_dir = out / "tokenizer"
    if not tok_dir.is_dir():
        # Trained on what the models will read: the prompts as the template renders them, and every answer offered.
        texts = [f"[INST] {r['prompt']} [/INST]" for _, r in read_jsonl(data["noisy"])]
        texts += [r["response"] for _, r in read_jsonl(data["noisy"])]
        tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=out))
        train_tokenizer(texts, d.vocab_size).save(tmp)
        os.replace(tmp, tok_dir)
        log(f"demo: tokenizer ({d.vocab_size} pieces) -> {tok_dir}")
    tokenizer = minalign.load_tokenizer(tok_dir)

    for name, init, key, steps, lr in (("base", None, "noisy", d.base_steps, d.base_lr),
                                       ("teacher", paths["base"], "clean", d.teacher_steps, d.teacher_lr)):
        if paths[name].is_dir():
            continue
        # A killed run is started over (it holds no checkpoint before its last step, and takes about a minute).
        run = out / f"{name}.run"
        shutil.rmtree(run, ignore_errors=True)
        if init is None:  # the base starts from random weights, saved with the tokenizer as the trainer's input
            init = run / "init"
            model = minalign.Transformer(model_config(d, tokenizer.vocab_size)).init_weights(seed=d.seed)
            minalign.save_model(model, init)
            tokenizer.save(init)
        log(f"demo: training the {name} ({steps} SFT steps on {data[key]})")
        os.replace(sft(init, data[key], steps, lr, d, run), paths[name])
        shutil.rmtree(run)
        log(f"demo: {name} -> {paths[name]}")
    return paths
