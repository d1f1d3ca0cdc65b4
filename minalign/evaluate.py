"""The evaluate stage: how good the policy a round starts from is — its metrics.json — and the run's table and plot.

Round k's metrics describe π_k, the policy round k starts from (round 0: the starting policy):

    batch_reward      mean reward of all its samples of the round's prompts
    batch_reward_max  mean over prompts of the best sample's reward: what selection keeps
    eval_reward       mean reward of its samples of the held-out prompts
    mean_length       response tokens (reward-based selection drifts toward length, so watch it)
    truncated         share of responses cut at max_new_tokens
    accuracy          the ground-truth metric on the held-out prompts, when [eval] metric names one
    win_rate          how often eval.judge prefers π_k's held-out responses to π_0's (round k's compare.json,
                      compare.py), with win_rate_interval (95%, bootstrap over prompts) and lc_win_rate, the same
                      with length controlled for (AlpacaEval 2.0's GLM), and its interval; from round 1 on

A batch reward from PairRM means nothing (its scores sum to zero over each prompt's samples), so with PairRM the
win rate is what tells the rounds apart; with the log ratio both are shown, and batch reward stays the rule
(Merlinite-7B-pt's).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from minalign.data import atomic_write, read_jsonl
from minalign.errors import MinalignError, RewardError
from minalign.rewards import call_source, load_function


@dataclass
class EvalSection:
    n: int = 1  # samples per held-out prompt
    temperature: float = -1.0  # < 0: sample.temperature
    metric: str = ""  # ground truth: a 'module:function' of the reward interface, 1.0/0.0 per response ("" = none)
    judge: str = ""  # who judges π_k's held-out responses against π_0's (score.py --judge: compare.JUDGE_HELP); "" = the loop's reward


def evaluate(cfg: EvalSection, k: int, scores: Path | None, eval_scores: Path | None, policy: str, out: Path,
             comparison: Path | None = None) -> dict:
    """The stage: round k's metrics (module doc) from its scores and held-out scores files (None: not sampled;
    no held-out prompts), its comparison with π_0 (compare.json; None: none) and cfg.metric, the ground-truth
    function ("" = none), written to out (metrics.json); policy: the policy's dir, recorded with them. Returns the
    metrics."""
    rows = [row for _, row in read_jsonl(scores)] if scores is not None else []
    evals = [row for _, row in read_jsonl(eval_scores)] if eval_scores is not None else []
    try:
        accuracy = call_source(load_function(cfg.metric), evals, cfg.metric) if cfg.metric and evals else None
    except MinalignError:
        raise
    except ValueError as e:  # raised by the user's function itself
        raise RewardError(f"eval.metric {cfg.metric}: {e}") from None
    m = round_metrics(k, rows, evals, accuracy)
    if comparison is not None:
        m.update(win_rate_metrics(comparison))
    m["policy"] = policy
    atomic_write(out, json.dumps(m, indent=1) + "\n")
    return m


def win_rate_metrics(comparison: Path) -> dict:
    """The metrics of a comparison with π_0 (compare.json): its win rates and their intervals."""
    c = json.loads(comparison.read_text())
    return {key: c[key] for key in ("win_rate", "win_rate_interval", "lc_win_rate", "lc_win_rate_interval")}


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
           ("accuracy", "accuracy", "{:.3f}"), ("win_rate", "win rate", "{:.3f}"),
           ("win_rate_interval", "95% interval", "{0[0]:.2f}-{0[1]:.2f}"), ("lc_win_rate", "LC win rate", "{:.3f}"),
           ("mean_length", "mean length", "{:.1f}"), ("selected", "selected", "{}")]


def table(rounds: list[dict]) -> str:
    """The per-round metrics as an aligned text table (a column only when some round has it)."""
    cols = [(key, title, fmt) for key, title, fmt in COLUMNS if any(r.get(key) is not None for r in rounds)]
    cells = [[title for _, title, _ in cols]]
    cells += [["-" if r.get(key) is None else fmt.format(r[key]) for key, _, fmt in cols] for r in rounds]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


def plot(rounds: list[dict], path: Path, title: str) -> None:
    """summary.png: batch reward (mean and best-of-n), held-out reward, accuracy, the win rates against π_0 (with
    the win rate's 95% interval shaded) and response length by round."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    x = [r["round"] for r in rounds]
    panels = [("reward", [("batch_reward", "batch (mean)"), ("batch_reward_max", "batch (best of n)"),
                          ("eval_reward", "held-out")]),
              ("accuracy (held-out)", [("accuracy", "accuracy")]),
              ("win rate against π_0 (held-out)", [("win_rate", "win rate"), ("lc_win_rate", "length-controlled")]),
              ("mean response length (tokens)", [("mean_length", "batch")])]
    panels = [(t, [(k, lab) for k, lab in lines if any(r.get(k) is not None for r in rounds)]) for t, lines in panels]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, lines) in zip(axes[0], panels):
        for key, label in lines:
            dashed = key == "lc_win_rate"  # it often lies on the win rate: dashed, so both show
            ax.plot(x, [r.get(key) for r in rounds], marker="s" if dashed else "o", ls="--" if dashed else "-",
                    label=label)
        ax.set_title(name, fontsize=10)
        if name.startswith("win rate"):
            rows = [r for r in rounds if r.get("win_rate_interval")]
            ax.fill_between([r["round"] for r in rows], [r["win_rate_interval"][0] for r in rows],
                            [r["win_rate_interval"][1] for r in rows], alpha=0.2, label="95% interval")
            ax.axhline(0.5, color="gray", lw=0.8, ls="--")  # π_0 against itself
        if name.startswith(("accuracy", "win rate")):
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
