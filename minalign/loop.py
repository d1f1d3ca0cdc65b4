"""The alignment loop: rounds of sample → score → evaluate → select → train, each from the last one's policy.

    round k:  policy π_k ── sample N per prompt (round_k/prompts.jsonl → samples.jsonl)     sample.py
              ── score them (→ scores.jsonl)                                                 score.py
              ── sample and score the held-out prompts (→ eval_samples.jsonl, eval_scores.jsonl)
              ── judge them against π_0's (k ≥ 1: → compare.json)                           compare.py
              ── evaluate π_k (→ metrics.json)                                               evaluate.py
              ── select (→ train.jsonl)                                                      select.py
              ── the audit report of the round's scores (→ report.html)                      report.py
              ── train from π_k (→ train/final = π_{k+1})                                    train.py

Two recipes:
- rejection-sampling (Merlinite-7B-pt): keep each prompt's highest-reward sample; SFT π_k on them. Rounds run to
  loop.rounds, or until the batch reward has not improved for loop.patience rounds (Merlinite-7B-pt's reward
  rose to round 2 and saturated at round 3); the result is the policy with the peak batch reward. With PairRM,
  whose scores only rank the samples of one prompt, the held-out win rate against π_0 takes the batch reward's
  place (π_0's own is 0.5); without held-out prompts every round runs and the result is the last policy.
- iterative-dpo (Snorkel-Mistral-PairRM-DPO): chosen = the top-ranked sample, rejected = the bottom-ranked; DPO
  from π_k. The DPO reference is a setting, since public recipes differ: loop.dpo_reference = "previous" (π_k,
  the policy the round starts from) or "initial" (π_0).
Round k's metrics describe the policy round k starts from (evaluate.py lists them); the last round,
loop.rounds, only samples, scores and evaluates the last policy.

Every stage reads files and writes one artifact atomically; a stage whose artifact exists is done. So a killed
loop, started again with the same settings, resumes at the first unfinished stage (sampling, scoring and training
also resume inside the stage, from their partial files and checkpoints) and redoes nothing. Each stage is its
file's one function, called with a typed config; the sample, score and train stages are printed as the sample.py,
score.py and train.py command lines that redo them (settings.command_line), so a round can be audited or redone by
hand.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from minalign import distributed
from minalign import sample as sample_stage
from minalign import score as score_stage
from minalign.compare import compare_stage
from minalign.data import atomic_write, read_jsonl, write_jsonl
from minalign.errors import RunError
from minalign.evaluate import evaluate, plot, table, win_rate_metrics
from minalign.loop_setup import (LoopConfig, compare_config, eval_temperature, report_config, round_train_config,
                                 sample_config, start_run)
from minalign.prompts import draw_prompts
from minalign.report import report_stage
from minalign.runs import on_main, run_lock
from minalign.select import select
from minalign.settings import command_line
from minalign.train import check_config, train
from minalign.train_state import latest_checkpoint


def run_loop(cfg: LoopConfig, rank: int = 0, world: int = 1, device: torch.device | None = None,
             after_stage: Callable[[int, str], None] | None = None) -> dict:
    """Run (or resume) the loop cfg describes, owning its run dir meanwhile (runs.run_lock); returns the summary
    {"recipe", "rounds": [metrics...], "best": {"round", "policy"}}."""
    with run_lock(cfg.run_dir, "loop.out", make_parent=True):
        return Loop(cfg, rank, world, device, after_stage).run()


class Loop:
    """One run of the loop on this rank: the stages of each round, each skipped when its artifact exists.

    after_stage(k, name), if given, is called after each stage (done now or found done): progress reports, and
    the tests' way to kill the loop at every stage boundary.
    """

    def __init__(self, cfg: LoopConfig, rank: int = 0, world: int = 1, device: torch.device | None = None,
                 after_stage: Callable[[int, str], None] | None = None):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.device = device or torch.device("cpu")
        self.after_stage = after_stage or (lambda k, name: None)
        self.main = distributed.is_main()
        self.run_dir = cfg.run_dir
        self.pool, self.has_eval = [], False  # set by start_run

    def log(self, text: str) -> None:
        if self.main:
            print(f"loop: {text}", file=sys.stderr, flush=True)

    # -- all rounds -------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Every round (at most loop.rounds of training, then the last policy measured); returns the summary."""
        cfg = self.cfg
        self.pool, self.has_eval = start_run(cfg, self.world, self.device.type, self.log)
        rounds: list[dict] = []
        best, since_best = None, 0
        # PairRM's scores are relative to the other samples of a prompt (they sum to 0), so a batch mean compares
        # nothing across rounds: the held-out win rate against π_0 does. Without held-out prompts every round
        # runs, the result is the last policy, and no round is spent only measuring it.
        relative = cfg.reward.kind == "pairrm"
        by_win_rate = relative and self.has_eval
        last_wins = relative and not self.has_eval  # nothing ranks the rounds: the result is the last policy
        key = "win_rate" if by_win_rate else "batch_reward"

        def value(m: dict) -> float:  # what picks the best round; π_0 against itself wins half the time
            return 0.5 if by_win_rate and m["round"] == 0 else m[key]
        summary = None
        for k in range(cfg.loop.rounds + 1):
            if last_wins and k == cfg.loop.rounds:
                best = {"round": k, "policy": str(self.policy(k))}
                summary = self.write_summary(rounds, best)
                break
            last = k == cfg.loop.rounds
            m = self.measure(k, batch=not (by_win_rate and last))  # the last round's batch reward picks nothing
            if best is None or last_wins or value(m) > value(best):
                best, since_best = m, 0
            else:
                since_best += 1
            stop = last
            if not stop and cfg.loop.patience and not last_wins and since_best >= cfg.loop.patience:
                self.log(f"round {k}: no higher {key.replace('_', ' ')} for {since_best} round(s) (loop.patience "
                         f"{cfg.loop.patience}); stopping")
                stop = True
            if not stop:
                m["selected"] = self.improve(k)["selected"]
            else:
                self.report(k)
            rounds.append(m)
            summary = self.write_summary(rounds, best)
            if self.main:
                print(table(rounds), file=sys.stderr, flush=True)
            if stop:
                break
        # Round k's metrics describe π_k, the policy round k starts from: round_{k-1}'s training made it.
        why = ("the last" if last_wins else
               f"the highest {key.replace('_', ' ')}{' against π_0' if by_win_rate else ''}, {value(best):.4g}")
        made = "the starting policy" if best["round"] == 0 else f"trained in round {best['round'] - 1}"
        self.log(f"best policy: π_{best['round']} ({why}; {made}): {best['policy']}")
        self.log(f"summary: {self.run_dir / 'summary.json'}, {self.run_dir / 'summary.png'}, and the link "
                 f"{self.run_dir / 'best'} to the best policy")
        return summary

    # -- one round --------------------------------------------------------------------------------------------
    def measure(self, k: int, batch: bool = True) -> dict:
        """Round k up to its metrics: draw prompts, sample and score them (unless not batch), sample and score the
        held-out prompts and judge them against π_0's, evaluate π_k. Returns the metrics."""
        cfg, d, run = self.cfg, self.run_dir / f"round_{k}", self.run_dir
        if self.main:
            d.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        seed, device = cfg.loop.seed * 1000 + k, self.device.type
        if batch:
            self.stage(k, "prompts", d / "prompts.jsonl", lambda: on_main(lambda: write_jsonl(
                d / "prompts.jsonl", draw_prompts(self.pool, cfg.prompts.per_round, cfg.prompts.by_source,
                                                  cfg.loop.seed, k))))
            self.run_stage(k, "sample", "sample.py", sample_stage.sample, sample_config(
                cfg, self.policy(k), d / "prompts.jsonl", d / "samples.jsonl", cfg.sample.n,
                cfg.sample.temperature, seed, device))
            self.run_stage(k, "score", "score.py", score_stage.score, cfg.reward.stage_config(
                d / "samples.jsonl", d / "scores.jsonl", device))
        comparison = None
        if self.has_eval:
            self.run_stage(k, "eval sample", "sample.py", sample_stage.sample, sample_config(
                cfg, self.policy(k), run / "eval_prompts.jsonl", d / "eval_samples.jsonl", cfg.eval.n,
                eval_temperature(cfg), seed + 500, device))
            # (the per-token terms are for the report of the round's own scores)
            self.run_stage(k, "eval score", "score.py", score_stage.score, dataclasses.replace(
                cfg.reward, token_logprobs=False).stage_config(d / "eval_samples.jsonl", d / "eval_scores.jsonl",
                                                               device))
            if k > 0:
                comparison = compare_config(cfg, k, device)
                self.run_stage(k, "compare", "score.py", compare_stage, comparison)
        self.stage(k, "metrics", d / "metrics.json", lambda: on_main(lambda: evaluate(
            cfg.eval, k, d / "scores.jsonl" if batch else None, d / "eval_scores.jsonl" if self.has_eval else None,
            str(self.policy(k)), d / "metrics.json", Path(comparison.out) if comparison else None)))
        m = json.loads((d / "metrics.json").read_text())
        if comparison is not None and "win_rate" not in m:  # measured before the loop compared rounds: add it
            m.update(win_rate_metrics(Path(comparison.out)))
            on_main(lambda: atomic_write(d / "metrics.json", json.dumps(m, indent=1) + "\n"))
        return m

    def improve(self, k: int) -> dict:
        """Round k's selection and training (π_k → π_{k+1}); returns the selection counts."""
        cfg, d = self.cfg, self.run_dir / f"round_{k}"
        self.stage(k, "select", d / "train.jsonl", lambda: on_main(lambda: select(
            cfg.select, cfg.loop.recipe, d / "scores.jsonl", d / "train.jsonl", cfg.policy.system)))
        self.report(k)

        def train_round() -> None:
            rows = sum(1 for _ in read_jsonl(d / "train.jsonl"))
            tcfg = round_train_config(cfg, k, self.policy(k), d / "train.jsonl", rows)
            tcfg.train.resume = latest_checkpoint(Path(tcfg.train.out)) is not None
            check_config(tcfg)
            self.log("  python " + shlex.join(command_line("train.py", tcfg)))
            if not train(tcfg, self.rank, self.world, self.device)["final"]:  # train.stop_after ended it early
                raise RunError(f"round {k}: training stopped before its last step (train.stop_after); run the same "
                               f"command again to continue it")
        self.stage(k, "train", d / "train" / "final", train_round)
        if self.main and not cfg.loop.keep_checkpoints:  # final/ is in place: the optimizer state is not needed
            shutil.rmtree(d / "train" / "checkpoints", ignore_errors=True)  # (also what a kill before this left)
        return json.loads((d / "selection.json").read_text())

    def report(self, k: int) -> None:
        """Round k's audit report (report.html) of its scores, with what selection kept (when it ran)."""
        d = self.run_dir / f"round_{k}"
        if not (d / "scores.jsonl").exists():  # PairRM's last round samples only the held-out prompts
            return
        page, train = d / "report.html", d / "train.jsonl"
        if self.main and page.exists() and train.exists() and page.stat().st_mtime_ns < train.stat().st_mtime_ns:
            page.unlink()  # written when this was the last round, before more rounds were asked for: no marks
        distributed.barrier()  # every rank looks for the page after that
        self.run_stage(k, "report", "-m minalign.report", report_stage, report_config(self.cfg, k, self.policy(k)))

    # -- the stages -------------------------------------------------------------------------------------------
    def policy(self, k: int) -> Path:
        """π_k: the starting policy, or the model round k−1 trained."""
        return Path(self.cfg.policy.path) if k == 0 else self.run_dir / f"round_{k - 1}" / "train" / "final"

    def stage(self, k: int, name: str, artifact: Path, make: Callable[[], None]) -> None:
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

    def run_stage(self, k: int, name: str, script: str, fn: Callable, stage_cfg) -> None:
        """A stage command (sample.py, score.py, python -m minalign.report) in this process, on this process group,
        into stage_cfg.out; its command line is printed first."""
        def make() -> None:
            argv = command_line(script, stage_cfg)
            self.log("  python " + shlex.join(script.split() + argv[1:]))  # script: "sample.py", "-m minalign.report"
            fn(stage_cfg, self.rank, self.world, self.device)
        self.stage(k, name, Path(stage_cfg.out), make)

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
            os.symlink(os.path.relpath(Path(best["policy"]).resolve(), run.resolve()), tmp)
            os.replace(tmp, link)
        distributed.barrier()
        return summary
