"""Selection: which sampled responses a round trains on, and which one best-of-N returns.

Rows are score stage rows: {"id", "prompt", "responses": [{"text", "finish_reason", "reward", ...}, ...]}.
A candidate is a response that is not empty and that the model ended itself: a response cut at max_new_tokens
("length") would be trained as if it ended there, since the trainer appends the end token.
"""
from __future__ import annotations

from minalign.data import as_messages


def candidates(row: dict, keep_truncated: bool = False) -> list[int]:
    """Indices of the responses of a scored row that selection may pick: not empty (after stripping whitespace)
    and, unless keep_truncated, ended by the model ("stop") rather than cut at max_new_tokens ("length")."""
    return [j for j, r in enumerate(row["responses"]) if r["text"].strip()
            and (keep_truncated or r.get("finish_reason") != "length")]


def _prompt(row: dict, system: str):
    """The prompt of a samples row for a training row: as sampled, with the system message sampling added."""
    return as_messages(row["prompt"], system) if system else row["prompt"]


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
        out.append({"id": row["id"], "prompt": _prompt(row, system), "response": r["text"], "reward": r["reward"]})
    return out, {"prompts": len(rows), "selected": len(out), "no_candidate": none}


def select_pairs(rows: list[dict], keep_truncated: bool = False, min_margin: float = 0.0,
                 system: str = "") -> tuple[list[dict], dict]:
    """Iterative DPO: chosen = the top-ranked candidate (the first of equals), rejected = the bottom-ranked (the
    last of equals), as {"id", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}; a prompt with
    fewer than two candidates, or whose rewards differ by no more than min_margin (all tied), gives no pair."""
    out, none, tied = [], 0, 0
    for row in rows:
        cands = candidates(row, keep_truncated)
        if len(cands) < 2:
            none += 1
            continue
        reward = [row["responses"][j]["reward"] for j in range(len(row["responses"]))]
        top = max(cands, key=lambda j: (reward[j], -j))
        bottom = min(cands, key=lambda j: (reward[j], -j))
        if reward[top] - reward[bottom] <= min_margin:
            tied += 1
            continue
        out.append({"id": row["id"], "prompt": _prompt(row, system), "chosen": row["responses"][top]["text"],
                    "rejected": row["responses"][bottom]["text"], "chosen_reward": reward[top],
                    "rejected_reward": reward[bottom]})
    return out, {"prompts": len(rows), "selected": len(out), "no_candidate": none, "tied": tied}


def best_index(row: dict) -> int:
    """Best-of-N's pick: the highest-reward candidate (the first of equals); with no candidate, the highest-reward
    response of all."""
    cands = candidates(row) or list(range(len(row["responses"])))
    return max(cands, key=lambda j: (row["responses"][j]["reward"], -j))
