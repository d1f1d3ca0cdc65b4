"""The audit report: one self-contained HTML page of what a reward chose in a scores file, and why, token by token.

    python -m minalign.report --scores round_1/scores.jsonl --out round_1/report.html \
        --tokenizer POLICY_DIR --train round_1/train.jsonl --metrics round_1/metrics.json \
        --metric minalign.demo:accuracy

The loop writes one per round (round_k/report.html) and prints this command beside the other stages. The log-ratio
reward decomposes exactly over the response's tokens,

    r(x, y) = s · Σ_t [log π_policy(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)],    s = β (÷ |y| with normalize mean)

so with score.py --token-logprobs (the loop's reward.token_logprobs) each token is shown coloured by its term
s·(policy_t − ref_t) on a diverging scale (blue raised the reward, red lowered it; the exact values on hover), and the
terms of a response add up to its reward. s is read off each response (reward / (Σ policy − Σ reference)), so the
page needs no β. PairRM and a user's function have no per-token terms: their responses are plain text with the score.

The page, top to bottom:
- the round's metrics (--metrics) and the file's own counts; a scatter of reward against response length (length is
  what rewards drift toward);
- with a ground truth (--metric, the reward interface, 1/0 per response): the prompts where the reward kept a wrong
  answer although a right one was sampled — over-optimisation — the widest reward gap first;
- the prompts whose kept response has the highest and the lowest reward;
- every prompt of the file in a search box (id and prompt text; a few lines of plain JS over an embedded JSON index,
  shown with textContent): the page holds the sections above in full (at most --limit prompts each), so a
  20,000-prompt round still opens at once; `--ids` renders any prompts in full.
Each prompt lists its samples ranked by reward, with the one selection kept marked (--train: rejection sampling's
row, or iterative DPO's chosen and rejected; without it, "best": the one best-of-N would return), lengths and
finish reasons. report.html#q=TEXT opens with a search.

Every string from a file (prompts and responses come from public datasets and from the model) is text: escaped for
HTML, its control and bidi characters (U+202E and kin) shown as visible U+ codes, and inside the embedded JSON `<`,
`>` and `&` written as \\u escapes, so no string can close the script element or run.
"""
from __future__ import annotations

import html
import json
import math
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from minalign import cli
from minalign.data import atomic_write, read_json_object, read_jsonl
from minalign.errors import ConfigError, DataError, MinalignError, RewardError
from minalign.rewards import call_source, load_function
from minalign.rows import response_texts, sample_prompt
from minalign.runs import on_main, output_done, owning_out
from minalign.select import best_index
from minalign.settings import flag


@dataclass(kw_only=True)
class ReportConfig:
    """The report's flags (python -m minalign.report)."""

    scores: str = flag()  # score.py's output JSONL
    out: str = flag()  # the HTML file
    tokenizer: str | None = None  # a checkpoint dir with the tokenizer of the responses' token_ids (the sampling policy's): needed to show each token
    train: str | None = None  # select's train.jsonl for these scores: marks the response kept (SFT) or the chosen and rejected (DPO)
    metrics: str | None = None  # the round's metrics.json, shown at the top
    metric: str | None = flag(None, metavar="MODULE:FUNCTION")  # the ground truth (eval.metric's interface: 1/0 per response): finds where the reward kept a wrong answer
    metric_optional: bool = False  # a --metric that fails on these rows is left out (said on stderr and in the page) instead of stopping: the loop's, whose eval.metric was written for the held-out prompts
    ids: list = flag([], metavar="ID")  # render these prompts in full as well (ids as in the file)
    limit: int = 50  # prompts in full per section
    resume: bool = False  # a finished --out: nothing to do
    overwrite: bool = False  # redo a finished --out


# ------------------------------------------------------------------------------------------------ escaping

def _hidden(ch: str) -> bool:
    """A character that is not seen as itself: controls, and format characters (bidi overrides, zero-width)."""
    return ch not in "\n\t" and unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")


def text(s: str) -> str:
    """s as HTML text: escaped, its hidden characters as visible codes (a marked U+XXXX)."""
    return "".join(f'<span class="ctl">U+{ord(ch):04X}</span>' if _hidden(ch) else ch
                   for ch in html.escape(s, quote=True))


def plain(s: str) -> str:
    """s with its hidden characters as U+XXXX: for an attribute value (escaped by attr) or the search index."""
    return "".join(f"U+{ord(ch):04X}" if _hidden(ch) else ch for ch in s)


def attr(s: str) -> str:
    """s as a quoted attribute's value or a <title>: escaped, hidden characters as U+XXXX, no markup."""
    return html.escape(plain(s), quote=True)


def json_for_script(value) -> str:
    """value as JSON that can sit inside <script type="application/json">: ASCII only, and no <, > or &."""
    return (json.dumps(value, ensure_ascii=True).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026"))


# ------------------------------------------------------------------------------------------------ the rows

def _difference(response: dict) -> float:
    return response.get("policy_logprob", 0.0) - (response.get("reference_logprob") or 0.0)


def token_terms(response: dict, fallback: float = 1.0) -> list[tuple[float, float | None, float]] | None:
    """(policy_t, reference_t or None, term_t) per token, term_t = s·(policy_t − reference_t) with s = reward /
    (Σ policy − Σ reference), so the terms add up to the reward; s = fallback when that difference is ~0 (the file's
    typical s: typical_scale). None when the response has no per-token log-probs (another reward, or scored
    without --token-logprobs)."""
    policy = response.get("policy_token_logprobs")
    if not isinstance(policy, list):
        return None
    reference = response.get("reference_token_logprobs")
    ref = reference if isinstance(reference, list) else [None] * len(policy)
    diff = _difference(response)
    scale = response["reward"] / diff if abs(diff) > 1e-6 else fallback  # β, or β/|y| (normalize mean)
    return [(p, r, scale * (p - (r or 0.0))) for p, r in zip(policy, ref)]


def typical_scale(rows: list[dict]) -> float:
    """The median s = reward / (Σ policy − Σ reference) of a file's responses: β for a sum, for the responses
    whose difference is too small to read it off."""
    scales = sorted(r["reward"] / _difference(r) for row in rows for r in row["responses"]
                    if "policy_token_logprobs" in r and abs(_difference(r)) > 1e-6)
    return scales[len(scales) // 2] if scales else 1.0


def kept_marks(row: dict, picked: dict | None) -> dict[int, str]:
    """{response index: "kept" | "chosen" | "rejected"} of a scores row from its train.jsonl row (matched by text:
    the highest-reward response with the kept or chosen text, the lowest with the rejected one)."""
    if picked is None:
        return {}
    texts, rewards = [r["text"] for r in row["responses"]], [r["reward"] for r in row["responses"]]
    marks = {}
    for key, mark, pick in (("response", "kept", max), ("chosen", "chosen", max), ("rejected", "rejected", min)):
        same = [j for j, t in enumerate(texts) if key in picked and t == picked[key] and j not in marks]
        if same:
            marks[pick(same, key=lambda j: rewards[j])] = mark
    return marks


def best_kept(row: dict, marks: dict[int, str]) -> int:
    """The response selection kept (or chose); without a selection (the last round, or no --train), the one
    best-of-N would return (select.best_index: the highest-reward non-empty response the model ended), marked
    "best"."""
    kept = [j for j, m in marks.items() if m in ("kept", "chosen")]
    if kept:
        return kept[0]
    best = best_index(row)
    marks[best] = "best"
    return best


# ------------------------------------------------------------------------------------------------ the page

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
h1{font-size:20px} h2{font-size:17px;margin-top:32px;border-bottom:1px solid #ccc}
table{border-collapse:collapse} td,th{padding:3px 8px;border-bottom:1px solid #eee;vertical-align:top;text-align:left}
.num{text-align:right;font-variant-numeric:tabular-nums}
.prompt{margin:14px 0;padding:8px 12px;border:1px solid #ddd;border-radius:6px}
.ptext{white-space:pre-wrap;font-weight:600}
.resp{white-space:pre-wrap;font-family:ui-monospace,monospace}
.t{border-radius:2px} .ctl{font:10px monospace;background:#fe0;color:#000;padding:0 2px;border:1px solid #aa0}
.mark{font-weight:700;color:#b35806} .wrong{color:#b2182b} .right{color:#2166ac} .note{color:#666}
"""

SEARCH_JS = """
const index = JSON.parse(document.getElementById('index').textContent);
const box = document.getElementById('q'), results = document.getElementById('results');
box.addEventListener('input', () => {
  results.replaceChildren();
  const q = box.value.toLowerCase();
  if (!q) return;
  for (const p of index) {
    if (results.children.length >= 50) break;
    if (String(p.id).toLowerCase().includes(q) || p.prompt.toLowerCase().includes(q)) {
      const li = document.createElement('li');
      li.textContent = `${p.id}: ${p.prompt} \\u2192 kept ${p.kept} (reward ${p.reward})`;
      results.appendChild(li);
    }
  }
});
if (location.hash.startsWith('#q=')) {  // report.html#q=TEXT opens with that search
  box.value = decodeURIComponent(location.hash.slice(3));
  box.dispatchEvent(new Event('input'));
}
"""


def _colour(term: float, top: float) -> str:
    """Blue for a term that raised the reward, red for one that lowered it; a square-root scale, so a term a tenth
    of the largest still shows."""
    a = math.sqrt(min(1.0, abs(term) / top)) * 0.85
    return f"rgba(33,102,172,{a:.3f})" if term > 0 else f"rgba(178,24,43,{a:.3f})"


def _piece(tokenizer, i: int) -> str:
    """A token as it reads in the text: sentencepiece's ▁ as a space, an ASCII byte piece (<0x0A>) as its character;
    the byte pieces of a longer UTF-8 character stay as they are (one alone is no character)."""
    piece = tokenizer.id_to_token(i)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">") and int(piece[3:5], 16) < 0x80:
        return chr(int(piece[3:5], 16))
    return piece.replace("\u2581", " ")


def response_html(response: dict, tokenizer, top: float, fallback: float = 1.0) -> str:
    """A response's text: each token coloured by its reward term when there are terms and a tokenizer that knows
    every token id, else the plain text."""
    terms = token_terms(response, fallback)
    ids = response.get("token_ids")
    if terms is None or tokenizer is None or not isinstance(ids, list) or len(ids) != len(terms) or \
            not all(type(i) is int and 0 <= i < tokenizer.vocab_size for i in ids):
        return text(response["text"])
    spans = []
    for i, (p, r, term) in zip(ids, terms):
        piece = _piece(tokenizer, i)
        tip = f"{piece!r}  policy {p:.4f}" + ("" if r is None else f"  reference {r:.4f}") + f"  term {term:+.4f}"
        spans.append(f'<span class="t" style="background:{_colour(term, top)}" title="{attr(tip)}">{text(piece)}</span>')
    return "".join(spans)


def prompt_html(row: dict, marks: dict[int, str], truth: list[float] | None, tokenizer, top: float,
                fallback: float) -> str:
    """A prompt's card: its text, then its samples ranked by reward with marks, lengths, finish reasons, truth."""
    prompt = "\n".join(f"{m['role']}: {m['content']}" for m in sample_prompt(row))
    order = sorted(range(len(row["responses"])), key=lambda j: -row["responses"][j]["reward"])
    lines = [f'<div class="prompt"><div class="note">id {text(repr(row["id"]))}</div>'
             f'<div class="ptext">{text(prompt)}</div><table><tr><th>#</th><th></th><th>reward</th><th>tokens</th>'
             f'<th>end</th>{"<th>truth</th>" if truth else ""}<th>response</th></tr>']
    for rank, j in enumerate(order, 1):
        r = row["responses"][j]
        right = "" if not truth else (f'<td class="{"right" if truth[j] else "wrong"}">'
                                      f'{"right" if truth[j] else "wrong"}</td>')
        lines.append(f'<tr><td class="num">{rank}</td><td class="mark">{marks.get(j, "")}</td>'
                     f'<td class="num">{r["reward"]:.4g}</td><td class="num">{len(r.get("token_ids") or [])}</td>'
                     f'<td>{text(str(r.get("finish_reason", "")))}</td>{right}'
                     f'<td class="resp">{response_html(r, tokenizer, top, fallback)}</td></tr>')
    return "\n".join(lines) + "</table></div>"


def scatter(rows: list[dict], kept: list[int], width: int = 640, height: int = 300) -> str:
    """An SVG scatter of reward against response tokens: every kept response (orange), and of the others every
    k-th, so at most ~4000 are drawn."""
    points = [(len(r.get("token_ids") or []), r["reward"], j == k) for row, k in zip(rows, kept)
              for j, r in enumerate(row["responses"])]
    others = [p for p in points if not p[2]]
    points = others[::max(1, len(others) // 4000)] + [p for p in points if p[2]]  # kept ones drawn last, on top
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs) or 1, min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    pad = 40

    def at(x, y):
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad), height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)
    dots = "".join(f'<circle cx="{at(x, y)[0]:.1f}" cy="{at(x, y)[1]:.1f}" r="{3 if k else 2}" '
                   f'fill="{"#e66101" if k else "#5e3c99"}" fill-opacity="{0.9 if k else 0.35}"/>' for x, y, k in points)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">'
            f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" fill="none" stroke="#999"/>'
            f'{dots}<text x="{pad}" y="{height - 12}" font-size="11">{x0}</text>'
            f'<text x="{width - pad}" y="{height - 12}" font-size="11" text-anchor="end">{x1} tokens</text>'
            f'<text x="4" y="{pad + 4}" font-size="11">{y1:.3g}</text>'
            f'<text x="4" y="{height - pad}" font-size="11">{y0:.3g}</text>'
            f'<text x="{width / 2}" y="16" font-size="12" text-anchor="middle">reward against response length '
            f'(orange: kept)</text></svg>')


def build(rows: list[dict], *, picked: dict | None = None, metrics: dict | None = None,
          truth: list[list[float]] | None = None, tokenizer=None, ids=(), limit: int = 50, title: str = "",
          note: str = "") -> str:
    """The report's HTML for scores rows (module doc); picked: train.jsonl rows by id; truth: the ground truth of
    every response (None: none); note: a line to show under the title."""
    marks = [kept_marks(row, (picked or {}).get(row["id"])) for row in rows]
    kept = [best_kept(row, m) for row, m in zip(rows, marks)]
    # Over-optimisation: a wrong answer kept while a right one was sampled, the widest reward gap first.
    wrong = []
    for k, (row, j) in enumerate(zip(rows, kept)):
        right = [i for i, v in enumerate(truth[k]) if v] if truth else []
        if truth and not truth[k][j] and right:
            wrong.append((row["responses"][j]["reward"] - max(row["responses"][i]["reward"] for i in right), k))
    wrong.sort(reverse=True)
    by_reward = sorted(range(len(rows)), key=lambda k: -rows[k]["responses"][kept[k]]["reward"])
    sections = [("Where the reward kept a wrong answer although a right one was sampled "
                 f"({len(wrong)} of {len(rows)} prompts; the widest reward gap first)", [k for _, k in wrong[:limit]]),
                (f"Highest reward kept (top {min(limit, len(rows))})", by_reward[:limit]),
                (f"Lowest reward kept (bottom {min(limit, len(rows))})", by_reward[::-1][:limit])]
    if not truth:
        sections = sections[1:]
    wanted = {str(i) for i in ids}
    missing = wanted - {str(row["id"]) for row in rows}
    if missing:
        raise ConfigError(f"--ids: no prompt with id {', '.join(sorted(missing))} in these scores")
    if wanted:
        sections.insert(0, ("Asked for (--ids)", [k for k, row in enumerate(rows) if str(row["id"]) in wanted]))
    shown = {k for _, ks in sections for k in ks}
    fallback = typical_scale(rows)
    terms = sorted(abs(t) for k in shown for r in rows[k]["responses"] for *_, t in (token_terms(r, fallback) or []))
    top = max(terms[int(0.95 * (len(terms) - 1))] if terms else 1.0, 1e-9)  # the 95th percentile: full colour
    responses = [r for row in rows for r in row["responses"]]
    counts = {"prompts": len(rows), "responses": len(responses),
              "mean reward": sum(r["reward"] for r in responses) / len(responses),
              "mean reward kept": sum(row["responses"][j]["reward"] for row, j in zip(rows, kept)) / len(rows),
              "mean tokens": sum(len(r.get("token_ids") or []) for r in responses) / len(responses)}
    if truth:
        counts["kept right"] = sum(truth[k][j] for k, j in enumerate(kept)) / len(rows)
    table = "".join(f"<tr><th>{text(str(key))}</th><td class='num'>{text(_fmt(v))}</td></tr>"
                    for key, v in {**(metrics or {}), **counts}.items())
    # The search reads the last message (the user's turn, not a long system message) and shows text as is.
    index = [{"id": plain(str(row["id"])), "prompt": plain(sample_prompt(row)[-1]["content"][:300]),
              "kept": plain(row["responses"][j]["text"][:80]), "reward": round(row["responses"][j]["reward"], 4)}
             for row, j in zip(rows, kept)]
    colours = ("each token coloured by its reward term: blue raised the reward, red lowered it (square-root scale, "
               f"full colour at |term| ≥ {top:.3g}); hover for the values" if terms else
               "no per-token terms in this file (another reward, or scored without --token-logprobs)"
               if tokenizer is not None else "no --tokenizer: responses as plain text")
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{attr(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{text(title)}</h1>"
             f"{f'<p class=note>{text(note)}</p>' if note else ''}<table>{table}</table>",
             f"<h2>Reward and length</h2>{scatter(rows, kept)}<p class='note'>{text(colours)}</p>"]
    for heading, ks in sections:
        parts.append(f"<h2>{text(heading)}</h2>" + "".join(
            prompt_html(rows[k], marks[k], truth[k] if truth else None, tokenizer, top, fallback) for k in ks))
    parts.append(f"<h2>Every prompt</h2><p class='note'>The sections above hold at most {limit} prompts each; "
                 f"search all {len(rows)} by id or text (python -m minalign.report --ids ID ... renders any in "
                 f"full).</p><input id='q' type='search' placeholder='id or prompt text' size='50'><ol id='results'>"
                 f"</ol><script type='application/json' id='index'>{json_for_script(index)}</script>"
                 f"<script>{SEARCH_JS}</script></body></html>")
    return "\n".join(parts) + "\n"


def _fmt(v) -> str:
    """A metric's value for the table."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(map(_fmt, v))
    return str(v)


# ------------------------------------------------------------------------------------------------ the stage

def read_scores(path: Path) -> list[dict]:
    """The rows of a scores file, each with a "reward" on every response (DataError naming path:line)."""
    rows = []
    for line, row in read_jsonl(path):
        try:
            sample_prompt(row)
            response_texts(row)
            if "id" not in row or not all(isinstance(r.get("reward"), (int, float)) and
                                          math.isfinite(r["reward"]) for r in row["responses"]):
                raise ValueError('a scores row needs an "id" and a finite "reward" on every response (score.py\'s '
                                 'output)')
        except ValueError as e:
            raise DataError(path, line, str(e)) from None
        rows.append(row)
    if not rows:
        raise MinalignError(f"--scores {path}: no rows")
    return rows


def report_stage(cfg: ReportConfig, rank: int = 0, world: int = 1, device=None) -> Path:
    """The report of cfg.scores into cfg.out (atomically, on rank 0), owning cfg.out meanwhile; returns cfg.out."""
    if cfg.limit < 0:
        raise ConfigError(f"--limit {cfg.limit} is out of range")
    return owning_out(_report, cfg, rank, world, device)


def _report(cfg: ReportConfig, rank: int, world: int, device) -> None:
    scores, out = Path(cfg.scores), Path(cfg.out)
    for name in ("scores", "train", "metrics"):
        if getattr(cfg, name) is not None and not Path(getattr(cfg, name)).is_file():
            raise ConfigError(f"--{name} {getattr(cfg, name)}: no such file")
    metric = load_function(cfg.metric) if cfg.metric else None  # imported now: a wrong name fails before any work
    if output_done(out, "report", resume=cfg.resume, overwrite=cfg.overwrite, scores=scores):
        return

    def run() -> None:
        from minalign.tokenizer import load_tokenizer
        rows = read_scores(scores)
        picked = {row.get("id"): row for _, row in read_jsonl(cfg.train)} if cfg.train else None
        try:
            metrics = read_json_object(cfg.metrics) if cfg.metrics else None
        except ValueError as e:
            raise ConfigError(f"--metrics {e}") from None
        truth, note = None, ""
        if metric is not None:
            try:
                truth = call_source(metric, rows, cfg.metric)
            except ValueError as e:  # a RewardError of the answer's shape, or raised by the user's function itself
                if not cfg.metric_optional:
                    raise RewardError(f"--metric {cfg.metric}: {e}") from None
                note = f"the ground truth {cfg.metric} failed on these rows, so it is left out: {e}"
                print(f"report: {note}", file=sys.stderr)
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
        page = build(rows, picked=picked, metrics=metrics, truth=truth, tokenizer=tokenizer, ids=cfg.ids,
                     limit=cfg.limit, title=f"minalign report: {scores}", note=note)
        atomic_write(out, page)
        print(f"report: {len(rows)} prompts, {len(page) / 1e6:.2f} MB -> {out}", file=sys.stderr)
    on_main(run)


def main(argv: list[str] | None = None) -> int:
    """python -m minalign.report: returns the exit status (0 done, 2 bad input)."""
    def parse(argv):
        return cli.parse_stage(cli.stage_parser(__doc__, ReportConfig), ReportConfig, argv)
    return cli.main("report", argv, parse, report_stage, kept="", interrupted="nothing was written; run it again")


if __name__ == "__main__":
    sys.exit(main())
