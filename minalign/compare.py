"""The compare stage: how often a judge prefers one samples file's responses (the candidate's) to another's (the
baseline's) on the same prompts — the head-to-head win rate both seeds are judged by (AlpacaEval 2.0) — and the
same with response length controlled for.

    python score.py --candidate round_3/eval_samples.jsonl --baseline round_0/eval_samples.jsonl \
        --judge pairrm:PAIRRM_DIR --out round_3/compare.json
    minalign.compare.compare(candidate, baseline, judge)            # the same from Python: the result dict

Prompts are matched by "id": both files hold the same prompts (the same text), with as many responses each, and
the candidate's response j meets the baseline's response j. The judge gives P, the probability that the
candidate's response is the better one (JUDGE_HELP lists the specs):

    pairrm:DIR         P = σ((m(x, c, b) − m(x, b, c)) / 2): PairRM's logit with the candidate first and with it
                       second, averaged (llm-blender's default "[A,B]+[B,A]" comparison; its compare() returns the
                       sum, whose σ would count the one judgement twice). Swapping the files gives exactly 1 − P.
    a reward spec      P = σ(r(c) − r(b)): Bradley–Terry on any reward source (log-ratio:…, module:function)
    rewards            the same on the "reward" the responses of two score.py outputs carry already (no model run)
    pairwise:MOD:FN    a user's judge: fn([{"id", "prompt", "candidate", "baseline"}, ...]) -> one P per item,
                       "candidate"/"baseline" being the two response texts

The result (written as JSON to --out):

    win_rate             W = the mean over prompts of the prompt's mean P (a tie, P = 0.5, counts half)
    win_rate_interval    the 2.5th and 97.5th percentiles of W over `bootstrap` resamples of the prompts
    lc_win_rate          the length-controlled win rate of AlpacaEval 2.0 (Dubois et al. 2024): fit the GLM
                             logit P = θ + φ · tanh(Δ / sd(Δ)),    Δ = len(c) − len(b), in characters
                         by maximum likelihood on the soft P (the cross-entropy), each prompt weighing one, and
                         predict with the length term at zero: LC = σ(θ). lc_win_rate_interval: refitted on the
                         same resamples.
    length_coef          φ: how much the judge's preference follows the length difference (0: not at all)
    candidate_length, baseline_length    mean response length in characters
    per_prompt           each prompt's id, P per response pair and the pair's lengths

Where we follow AlpacaEval's GLM (alpaca_eval/metrics/glm_winrate.py, "length_controlled_v1"): the length
feature tanh(Δ / sd(Δ)) in characters, soft preferences as the targets, and the prediction at Δ = 0. Where we
simplify: AlpacaEval's GLM also has an instruction-difficulty term (ψ_m − ψ_b)·γ_x, with γ_x fitted beforehand on
the annotations of many leaderboard models for its 805 instructions, regularises toward "gamed" baselines and
fits with an L1 penalty chosen by cross-validation. Two policies on one's own prompts have none of that, so the
term is dropped and the mean over instructions of σ(θ + (ψ_m − ψ_b)γ_x) becomes σ(θ); a tiny L2 penalty
(RIDGE) keeps θ finite when every P is 0 or 1. With no spread in Δ (every pair differs by the same number of
characters), the length term cannot be told from θ: it is left out (length_coef null) and LC ≈ W (equal but for
the penalty: 0.99993 when every P is 1).
"""
from __future__ import annotations

import json
import math
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minalign.data import atomic_write, read_jsonl
from minalign.errors import ConfigError, DataError, MinalignError, RewardError
from minalign.rewards import call_source, from_spec, load_function, parse_spec
from minalign.rows import BadRows, response_texts, sample_prompt
from minalign.runs import StageOptions, check_ranges, on_main, output_done, owning_out
from minalign.settings import flag

JUDGE_HELP = ("'pairrm:DIR' (PairRM, both orders averaged), any --reward spec ('log-ratio:...', 'module:function'; "
              "Bradley-Terry P = σ(r_candidate − r_baseline)), 'rewards' (the \"reward\" already in two score.py "
              "outputs), or 'pairwise:module:function' (a function of [{id, prompt, candidate, baseline}] returning "
              "P(candidate beats baseline) for each)")
RIDGE = 1e-4  # the L2 penalty on θ and φ, against a sum of prompt weights of one per prompt


@dataclass(kw_only=True)
class CompareConfig(StageOptions):
    """score.py's compare mode: its flags (--resume keeps a finished --out; --skip-invalid leaves out the prompts
    whose rows are bad or missing from the other file, and says which)."""

    candidate: str = flag()  # samples (or scores) JSONL of the policy being judged
    baseline: str = flag()  # samples (or scores) JSONL of the policy it is judged against, on the same prompts
    judge: str = flag(metavar="SPEC", help="who judges each pair: " + JUDGE_HELP)  # see JUDGE_HELP
    out: str = flag()  # the comparison, a JSON file
    bootstrap: int = 1000  # resamples of the prompts for the 95% intervals
    seed: int = 0  # the bootstrap's random seed


def check_config(cfg: CompareConfig) -> None:
    """ConfigError naming a bad flag."""
    check_judge(cfg.judge, "--judge")
    check_ranges({"--bootstrap": cfg.bootstrap >= 1, "--seed": cfg.seed >= 0}, cfg)


def check_judge(spec: str, name: str) -> None:
    """ConfigError naming the setting (name) when spec is not a judge."""
    if spec == "rewards":
        return
    where, _, fn = spec.removeprefix("pairwise:").rpartition(":")
    if not where or not fn:
        raise ConfigError(f"{name} {spec!r}: expected {JUDGE_HELP}")
    try:
        if spec.startswith("pairwise:"):
            if not fn.isidentifier():
                raise RewardError(f"reward {spec!r}: expected 'pairwise:module:function'")
        else:
            parse_spec(spec)
    except RewardError as e:
        raise ConfigError(f"{name}: {e}") from None


# ------------------------------------------------------------------------------------------------ the pairs

def read_side(path: Path, flag_name: str, bad: BadRows) -> dict:
    """{id: (line, row)} of a samples or scores file, each row's prompt and response texts checked."""
    rows = {}
    for line, row in read_jsonl(path, on_error=bad):
        try:
            if isinstance(row.get("id"), bool) or not isinstance(row.get("id"), (str, int)):
                raise ValueError(f'a samples row needs an "id", a string or an integer; got {row.get("id")!r}')
            sample_prompt(row)
            response_texts(row)
            if row["id"] in rows:
                raise ValueError(f"id {row['id']!r} is on line {rows[row['id']][0]} already")
        except ValueError as e:
            bad(DataError(path, line, str(e)))
            continue
        rows[row["id"]] = (line, row)
    if not rows:
        raise MinalignError(f"{flag_name} {path}: no rows")
    return rows


def matchups(candidate: Path, baseline: Path, bad: BadRows) -> list[tuple[dict, dict]]:
    """(candidate row, baseline row) of every prompt, in the candidate file's order; a prompt missing from either
    side, with another text or another number of responses is a DataError naming the file and line."""
    cand, base = read_side(candidate, "--candidate", bad), read_side(baseline, "--baseline", bad)
    out = []
    for key, (line, row) in cand.items():
        if key not in base:
            bad(DataError(candidate, line, f"id {key!r} is not in --baseline {baseline}"))
            continue
        bline, brow = base[key]
        if sample_prompt(brow) != sample_prompt(row):  # "q" and [{"role": "user", "content": "q"}] are one prompt
            bad(DataError(baseline, bline, f"id {key!r}: its prompt is not the one on line {line} of --candidate"))
        elif len(brow["responses"]) != len(row["responses"]):
            bad(DataError(baseline, bline, f"id {key!r} has {len(brow['responses'])} responses, line {line} of "
                                           f"--candidate {len(row['responses'])}: pairs are response j vs j"))
        else:
            out.append((row, brow))
    for key, (bline, _) in base.items():
        if key not in cand:
            bad(DataError(baseline, bline, f"id {key!r} is not in --candidate {candidate}"))
    if not out:
        raise MinalignError(f"--candidate {candidate} and --baseline {baseline} share no prompt")
    return out


# ------------------------------------------------------------------------------------------------ the judges

def _sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(x / 2))  # σ(x), without exp's overflow


def judge_pairs(judge: str, pairs: list[tuple[dict, dict]], device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> list[list[float]]:
    """P(the candidate's response j beats the baseline's response j) for each matched prompt (see the module doc)."""
    if judge == "rewards":
        return [[_sigmoid(_reward(c, judge, "candidate") - _reward(b, judge, "baseline"))
                 for c, b in zip(crow["responses"], brow["responses"])] for crow, brow in pairs]
    if judge.startswith("pairrm:"):
        from minalign.pairrm import load_pairrm, prompt_text  # the judge's model, loaded only when it judges
        ranker = load_pairrm(judge.removeprefix("pairrm:"), dtype=dtype, device=device)
        triples = [(prompt_text(crow), c["text"], b["text"]) for crow, brow in pairs
                   for c, b in zip(crow["responses"], brow["responses"])]
        first = ranker.compare_many(triples)  # the candidate first
        second = ranker.compare_many([(x, b, c) for x, c, b in triples])  # the baseline first
        return _per_prompt([_sigmoid((f - s) / 2) for f, s in zip(first, second)], pairs)
    if judge.startswith("pairwise:"):
        spec = judge.removeprefix("pairwise:")
        items = [{"id": crow["id"], "prompt": crow["prompt"], "candidate": c["text"], "baseline": b["text"]}
                 for crow, brow in pairs for c, b in zip(crow["responses"], brow["responses"])]
        return _per_prompt(_probabilities(load_function(spec)(items), len(items), judge), pairs)
    # a reward source: each prompt's candidate and baseline responses scored in one row, as the source expects
    rows = [{**crow, "responses": crow["responses"] + brow["responses"]} for crow, brow in pairs]
    kind, _ = parse_spec(judge)
    source = from_spec(judge) if kind == "python" else from_spec(judge, device=device, dtype=dtype)
    scores = call_source(source, rows, judge)
    return [[_sigmoid(r[j] - r[j + len(crow["responses"])]) for j in range(len(crow["responses"]))]
            for r, (crow, _) in zip(scores, pairs)]


def _reward(response: dict, judge: str, side: str) -> float:
    """The "reward" a scored response carries; RewardError when it has none."""
    value = response.get("reward")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RewardError(f"--judge {judge}: a {side} response has no finite \"reward\" (got {value!r}): give "
                          f"score.py outputs (scores.jsonl), or a judge that scores")
    return float(value)


def _probabilities(values, n: int, judge: str) -> list[float]:
    """A pairwise judge's answer, checked: n numbers in [0, 1]."""
    values = values.tolist() if hasattr(values, "tolist") else values
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{len(values)} items" if isinstance(values, (list, tuple)) else type(values).__name__
        raise RewardError(f"judge {judge}: expected one probability per comparison ({n}), got {got}")
    for k, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v <= 1:  # numpy's scalars are Reals
            raise RewardError(f"judge {judge}: comparison {k}: {v!r} is not a probability in [0, 1]")
    return [float(v) for v in values]


def _per_prompt(flat: list[float], pairs: list[tuple[dict, dict]]) -> list[list[float]]:
    """A flat list of one value per response pair, cut into one list per prompt."""
    out, at = [], 0
    for crow, _ in pairs:
        n = len(crow["responses"])
        out.append(flat[at:at + n])
        at += n
    return out


# ------------------------------------------------------------------------------------------------ the statistics

def fit_length_glm(p: np.ndarray, x: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(θ, φ) [B] of logit P = θ + φ·x fitted to the soft targets p [m] by weighted maximum likelihood, one fit per
    row of weights [B, m] (Newton's method on the cross-entropy + RIDGE/2 · (θ² + φ²), all B fits at once)."""
    theta, phi = np.zeros(len(weights)), np.zeros(len(weights))
    for _ in range(100):
        q = 1 / (1 + np.exp(-(theta[:, None] + phi[:, None] * x)))
        r, h = weights * (q - p), weights * q * (1 - q)
        g0, g1 = r.sum(1) + RIDGE * theta, (r * x).sum(1) + RIDGE * phi  # the gradient
        a, b, c = h.sum(1) + RIDGE, (h * x).sum(1), (h * x * x).sum(1) + RIDGE  # the Hessian [[a, b], [b, c]]
        det = a * c - b * b
        # A capped step: plain Newton on a logistic loss can overshoot from θ = φ = 0 when the targets are almost
        # separable (every P near 1); capped, it walks there and converges in a few more steps.
        d0, d1 = np.clip((c * g0 - b * g1) / det, -4, 4), np.clip((a * g1 - b * g0) / det, -4, 4)
        theta, phi = theta - d0, phi - d1
        if max(np.abs(d0).max(), np.abs(d1).max()) < 1e-10:
            break
    return theta, phi


def win_rates(prefs: list[list[float]], deltas: list[list[float]], bootstrap: int = 1000, seed: int = 0) -> dict:
    """Win rate, length-controlled win rate, φ and their 95% percentile-bootstrap intervals (resampling prompts)
    of each prompt's preferences P and length differences Δ (module doc)."""
    if bootstrap < 1 or not prefs:
        raise ConfigError(f"a comparison needs prompts and bootstrap >= 1 (got {len(prefs)} prompts, bootstrap "
                          f"{bootstrap})")
    sizes = np.array([len(v) for v in prefs])
    p, delta = np.array([v for row in prefs for v in row]), np.array([d for row in deltas for d in row], float)
    owner = np.repeat(np.arange(len(prefs)), sizes)  # [m]: the prompt of each pair
    means = np.array([sum(v) / len(v) for v in prefs])
    spread = delta.std(ddof=1) if len(delta) > 1 else 0.0
    x = np.tanh(delta / spread) if spread > 0 else np.zeros_like(delta)
    rng = np.random.default_rng(seed)
    counts = np.vstack([np.ones(len(prefs)), rng.multinomial(len(prefs), np.full(len(prefs), 1 / len(prefs)),
                                                              size=bootstrap)])  # row 0: the data itself
    w = counts / counts.sum(1, keepdims=True) * len(prefs)  # prompt weights, summing to the number of prompts
    theta, phi = fit_length_glm(p, x, w[:, owner] / sizes[owner])  # each prompt weighs one, split over its pairs
    wins, lc = w @ means / len(prefs), 1 / (1 + np.exp(-theta))

    def interval(values):
        return [float(v) for v in np.percentile(values[1:], [2.5, 97.5])]
    return {"win_rate": float(wins[0]), "win_rate_interval": interval(wins),
            "lc_win_rate": float(lc[0]), "lc_win_rate_interval": interval(lc),
            "length_coef": float(phi[0]) if spread > 0 else None}


# ------------------------------------------------------------------------------------------------ the comparison

def compare(candidate: str | Path, baseline: str | Path, judge: str, *, device: torch.device | str = "cpu",
            dtype: torch.dtype | None = None, bootstrap: int = 1000, seed: int = 0,
            skip_invalid: bool = False) -> dict:
    """The comparison of two samples files by judge (module doc): {"candidate", "baseline", "judge", "prompts",
    "comparisons", "win_rate", "win_rate_interval", "lc_win_rate", "lc_win_rate_interval", "length_coef",
    "candidate_length", "baseline_length", "bootstrap", "seed", "skipped", "per_prompt"}."""
    candidate, baseline = Path(candidate), Path(baseline)
    bad = BadRows(skip_invalid)
    pairs = matchups(candidate, baseline, bad)
    try:
        prefs = judge_pairs(judge, pairs, device, dtype)
    except MinalignError:
        raise
    except ValueError as e:  # raised by the judge itself (a user's function, PairRM on a malformed row)
        raise RewardError(f"--judge {judge}: {e}") from None
    lengths = [[(len(c["text"]), len(b["text"])) for c, b in zip(crow["responses"], brow["responses"])]
               for crow, brow in pairs]
    stats = win_rates(prefs, [[lc - lb for lc, lb in row] for row in lengths], bootstrap, seed)
    flat = [pair for row in lengths for pair in row]
    return {"candidate": str(candidate), "baseline": str(baseline), "judge": judge, "prompts": len(pairs),
            "comparisons": len(flat), **stats,
            "candidate_length": sum(c for c, _ in flat) / len(flat),
            "baseline_length": sum(b for _, b in flat) / len(flat), "bootstrap": bootstrap, "seed": seed,
            "skipped": [str(e) for e in bad.skipped],
            "per_prompt": [{"id": crow["id"], "preferences": pr, "candidate_lengths": [c for c, _ in ln],
                            "baseline_lengths": [b for _, b in ln]}
                           for (crow, _), pr, ln in zip(pairs, prefs, lengths)]}


def summary_line(result: dict) -> str:
    """One line of a comparison's figures, for stderr."""
    lo, hi = result["win_rate_interval"]
    return (f"{result['prompts']} prompts, {result['comparisons']} comparisons: win rate {result['win_rate']:.3f} "
            f"[{lo:.3f}, {hi:.3f}], length-controlled {result['lc_win_rate']:.3f}; mean length "
            f"{result['candidate_length']:.1f} vs {result['baseline_length']:.1f} characters ({result['judge']})")


def compare_stage(cfg: CompareConfig, rank: int = 0, world: int = 1, device: torch.device | None = None) -> Path:
    """score.py's compare mode: compare() into cfg.out (atomically, on rank 0), owning cfg.out meanwhile
    (runs.run_lock); returns cfg.out."""
    check_config(cfg)
    return owning_out(_compare_stage, cfg, rank, world, device)


def _compare_stage(cfg: CompareConfig, rank: int, world: int, device: torch.device) -> None:
    out = Path(cfg.out)
    for name in ("candidate", "baseline"):
        if not Path(getattr(cfg, name)).is_file():
            raise ConfigError(f"--{name} {getattr(cfg, name)}: no such file")
    if output_done(out, "score.py", resume=cfg.resume, overwrite=cfg.overwrite, candidate=Path(cfg.candidate),
                   baseline=Path(cfg.baseline)):
        return

    def run() -> None:
        result = compare(cfg.candidate, cfg.baseline, cfg.judge, device=device,
                         dtype=getattr(torch, cfg.weights_dtype(device)), bootstrap=cfg.bootstrap, seed=cfg.seed,
                         skip_invalid=cfg.skip_invalid)
        for err in result["skipped"]:
            print(f"score.py: skipped {err}", file=sys.stderr)
        atomic_write(out, json.dumps(result, indent=1) + "\n")
        print(f"score.py: {summary_line(result)} -> {out}", file=sys.stderr)
    on_main(run)
