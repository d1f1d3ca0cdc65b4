"""How the audit report (minalign/report.py) scales: a synthetic round of N prompts × 8 responses of 10-80 tokens,
with per-token terms, written as a scores file; the time and memory to write its report (each token drawn), the
page's size, and (when headless Chromium is installed) the time for Chromium to load and render it.

    python bench/bench_report.py                 # 20,000 prompts (a 390 MB scores file)
    python bench/bench_report.py --prompts 2000
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minalign.report import build, read_scores  # noqa: E402


class Pieces:
    """A tokenizer stand-in (every id reads as one word), so each token is drawn as the report draws it."""

    vocab_size = 100

    def id_to_token(self, i: int) -> str:
        return "\u2581w"


def synthetic_scores(path: Path, prompts: int, seed: int = 0) -> None:
    """A scores file like score.py --token-logprobs writes, of random words and log-probs."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(prompts):
            responses = []
            for _ in range(8):
                n = rng.randint(10, 80)
                p, q = [-3 * rng.random() for _ in range(n)], [-3 * rng.random() for _ in range(n)]
                responses.append({"text": " ".join(f"w{rng.randint(0, 99)}" for _ in range(n)), "token_ids": [5] * n,
                                  "finish_reason": "stop", "reward": sum(p) - sum(q), "policy_logprob": sum(p),
                                  "reference_logprob": sum(q), "num_tokens": n, "policy_token_logprobs": p,
                                  "reference_token_logprobs": q})
            f.write(json.dumps({"id": i, "prompt": f"Question number {i}: what is the answer?",
                                "responses": responses}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=20000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        scores, out = Path(d) / "scores.jsonl", Path(d) / "report.html"
        synthetic_scores(scores, args.prompts)
        start = time.perf_counter()
        out.write_text(build(read_scores(scores), tokenizer=Pieces(), title="bench"))  # what report_stage does
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB on Linux
        print(f"{args.prompts} prompts: scores {scores.stat().st_size / 1e6:.0f} MB -> report "
              f"{out.stat().st_size / 1e6:.1f} MB in {seconds:.1f} s, peak memory {peak:.2f} GB")
        chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if chromium is None:
            print("headless Chromium not installed: the page was not opened")
            return
        start = time.perf_counter()
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000",
                        f"--screenshot={Path(d) / 'shot.png'}", f"file://{out}"], capture_output=True, timeout=300,
                       check=True)
        print(f"headless Chromium: loaded and rendered (a screenshot) in {time.perf_counter() - start:.1f} s, "
              f"its start-up included")


if __name__ == "__main__":
    main()
