"""The select stage: which sampled responses a round trains on (scores.jsonl -> train.jsonl), and which one
best-of-N returns.

    rejection-sampling (Merlinite-7B-pt): each prompt's highest-reward candidate  -> SFT rows {"prompt", "response"}
    iterative-dpo (Snorkel): the top-ranked candidate vs the bottom-ranked        -> DPO rows {"prompt", "chosen", "rejected"}
                             (select.per_token: ranked by the log ratio per response token, so a long answer
                              does not win by summing more terms)

Rows are score stage rows: {"id", "prompt", "responses": [{"text", "finish_reason", "reward", ...}, ...]}.
A candidate is a response that is not empty and that the model ended itself: a response cut at max_new_tokens
("length") would be trained as if it ended there, since the trainer appends the end token.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from minalign.data import atomic_write, read_jsonl, write_jsonl
from minalign.errors import MinalignError
from minalign.rows import training_prompt


@dataclass
class SelectSection:
    keep_truncated: bool = False  # let responses cut at max_new_tokens be selected (they would be trained to end)
    min_margin: float = 0.0  # iterative-dpo: skip a prompt whose top and bottom rewards differ by this or less
    per_token: bool = False  # iterative-dpo with a log-ratio reward (normalize sum): rank a prompt's samples by reward / response tokens, the per-token log ratio (min_margin is then per token too)


def candidates(row: dict, keep_truncated: bool = False) -> list[int]:
    """Indices of the responses of a scored row that selection may pick: not empty (after stripping whitespace)
    and, unless keep_truncated, ended by the model ("stop") rather than cut at max_new_tokens ("length")."""
    return [j for j, r in enumerate(row["responses"]) if r["text"].strip()
            and (keep_truncated or r.get("finish_reason") != "length")]


def select_best(rows: list[dict], keep_truncated: bool = False, system: str = "") -> tuple[list[dict], dict]:
    """Rejection sampling: each prompt's highest-reward candidate (the first of equals) as an SFT row
    {"id", "prompt", "response", "reward"}; and counts {"prompts", "selected", "no_candidate"}."""
    out, none = [], 0
    for row in rows:
        cands = candidates(row, keep_truncated)
        if not cands:
            none += 1
            continue
        best = max(cands, key=lambda j: (row["responses"][j]["reward"], -j))
        r = row["responses"][best]
        out.append({"id": row["id"], "prompt": training_prompt(row, system), "response": r["text"], "reward": r["reward"]})
    return out, {"prompts": len(rows), "selected": len(out), "no_candidate": none}


def select_pairs(rows: list[dict], keep_truncated: bool = False, min_margin: float = 0.0, system: str = "",
                 per_token: bool = False) -> tuple[list[dict], dict]:
    """Iterative DPO: chosen = the top-ranked candidate (the first of equals), rejected = the bottom-ranked (the
    last of equals), as {"id", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}; a prompt with
    fewer than two candidates, or whose rewards differ by no more than min_margin (all tied), gives no pair.
    per_token: rank by reward / len(token_ids) (the rewards written are then those per-token values)."""
    out, none, tied = [], 0, 0
    for row in rows:
        cands = candidates(row, keep_truncated)
        if len(cands) < 2:
            none += 1
            continue
        reward = [r["reward"] / (max(1, len(r["token_ids"])) if per_token else 1) for r in row["responses"]]
        top = max(cands, key=lambda j: (reward[j], -j))
        bottom = min(cands, key=lambda j: (reward[j], -j))
        if reward[top] - reward[bottom] <= min_margin:
            tied += 1
            continue
        out.append({"id": row["id"], "prompt": training_prompt(row, system), "chosen": row["responses"][top]["text"],
                    "rejected": row["responses"][bottom]["text"], "chosen_reward": reward[top],
                    "rejected_reward": reward[bottom]})
    return out, {"prompts": len(rows), "selected": len(out), "no_candidate": none, "tied": tied}


def best_index(row: dict) -> int:
    """Best-of-N's pick: the highest-reward candidate (the first of equals); with no candidate, the highest-reward
    response of all."""
    cands = candidates(row) or list(range(len(row["responses"])))
    return max(cands, key=lambda j: (row["responses"][j]["reward"], -j))


def select(cfg: SelectSection, recipe: str, scores: Path, out: Path, system: str = "") -> dict:
    """The stage: the training rows of a scores file for recipe ("rejection-sampling" or "iterative-dpo") into out,
    and their counts into selection.json beside it (which it returns); system: the system message sampling added
    to the prompts, which the training rows keep."""
    rows = [row for _, row in read_jsonl(scores)]
    if recipe == "rejection-sampling":
        picked, stats = select_best(rows, cfg.keep_truncated, system)
    else:
        picked, stats = select_pairs(rows, cfg.keep_truncated, cfg.min_margin, system, cfg.per_token)
    if not picked:
        raise MinalignError(f"no prompt of {scores} gave a training row ({stats}); all samples empty, truncated or "
                            f"tied? (raise sample.max_new_tokens)")
    atomic_write(out.parent / "selection.json", json.dumps(stats) + "\n")
    write_jsonl(out, picked)  # last: its existence marks the stage done
    return stats
