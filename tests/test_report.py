"""The audit report (minalign/report.py): its content on known rows, untrusted text shown and never run, and the page
opened in headless Chromium when it is installed."""
import json
import re
import shutil
import subprocess

import pytest

from minalign import report
from minalign.report import build, token_terms

HOSTILE = ["<script>document.title='pwned'</script>", "</textarea><img src=x onerror=\"document.title='pwned'\">",
           "quotes \" ' and & and </script>", "bidi \u202eevil\u202c and zero-width \u200b and \x07 bell"]


def row(k, prompt, texts, rewards, terms=None):
    """A scores row: responses with rewards, and per-token log-probs when terms ([(policy, reference)...]) given."""
    responses = []
    for j, (t, r) in enumerate(zip(texts, rewards)):
        resp = {"text": t, "token_ids": list(range(3, 3 + max(1, len(t) // 2))), "finish_reason": "stop", "reward": r}
        if terms:
            p, q = zip(*terms[j])
            resp.update(policy_logprob=sum(p), reference_logprob=sum(q), num_tokens=len(p),
                        policy_token_logprobs=list(p), reference_token_logprobs=list(q), token_ids=[5] * len(p))
        responses.append(resp)
    return {"id": k, "prompt": prompt, "responses": responses}


def test_terms_add_up_to_the_reward():
    """The shown terms s·(policy_t − reference_t), s read off the response, add up to its reward: here β = 0.5."""
    terms = [(-1.0, -3.0), (-0.5, -0.25), (-2.0, -2.0)]  # differences +2, −0.25, 0: Σ = 1.75, reward 0.875
    r = row(0, "q", ["abc"], [0.875], [terms])["responses"][0]
    got = token_terms(r)
    assert [t for *_, t in got] == pytest.approx([1.0, -0.125, 0.0])
    assert sum(t for *_, t in got) == pytest.approx(r["reward"])
    assert token_terms({"text": "x", "reward": 1.0}) is None  # a reward without terms (PairRM, a function)


def test_untrusted_text_is_shown_not_run(tmp_path):
    rows = [row(k, p, [p, "plain"], [1.0, 0.0]) for k, p in enumerate(HOSTILE)]
    rows.append(row("id \"quoted\" <b>\u202e", "normal", ["a"], [0.5]))
    page = build(rows, title="report <script>\u202e")
    body_scripts = re.findall(r"<script[^>]*>", page)
    assert body_scripts == ["<script type='application/json' id='index'>", "<script>"]  # ours, no others
    assert "<img" not in page and "<b>" not in page and "onerror=\"" not in page
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in page
    assert "&lt;/textarea&gt;" in page
    assert '<span class="ctl">U+202E</span>' in page and '<span class="ctl">U+200B</span>' in page
    assert '<span class="ctl">U+0007</span>' in page
    assert "\u202e" not in page and "\x07" not in page
    assert "<title>report &lt;script&gt;U+202E</title>" in page  # no markup inside a title
    index = page.split("<script type='application/json' id='index'>")[1].split("</script>")[0]
    assert "<" not in index and ">" not in index and "&" not in index
    assert json.loads(index)[0]["prompt"] == HOSTILE[0]  # the same text once parsed
    assert json.loads(index)[3]["prompt"].startswith("bidi U+202EevilU+202C and")  # and shown by the search as codes


def test_sections_marks_and_colours(tmp_path):
    """Over-optimisation first (a wrong answer kept over a right one, the widest gap first), the marks of the
    selection, and tokens coloured by their terms with the values on hover."""
    terms = [[(-0.1, -3.0), (-0.1, -0.1)], [(-4.0, -1.0), (-0.1, -0.1)]]
    rows = [row("a", "What is 2 plus 2?", ["5", "4"], [2.9, -3.0], terms),  # wrong kept, by 5.9
            row("b", "What is 1 plus 1?", ["3", "2"], [0.5, 0.2]),  # wrong kept, by 0.3
            row("c", "What is 2 times 2?", ["4", "5"], [1.0, 0.0])]  # right kept
    truth = [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]
    picked = {"a": {"id": "a", "chosen": "5", "rejected": "4"}, "c": {"id": "c", "response": "4"}}

    class Tok:
        vocab_size = 32

        def id_to_token(self, i):
            return "\u2581x"
    page = build(rows, picked=picked, truth=truth, tokenizer=Tok(), metrics={"round": 1}, limit=10, title="t")
    assert "although a right one was sampled (2 of 3 prompts" in page
    wrong = page.split("although a right one was sampled")[1].split("Highest reward kept")[0]
    assert wrong.index("id &#x27;a&#x27;") < wrong.index("id &#x27;b&#x27;") and "id &#x27;c&#x27;" not in wrong
    assert ">chosen<" in page and ">rejected<" in page and ">kept<" in page
    assert ">best<" in page  # b has no train.jsonl row: the best-of-N pick is marked instead
    assert 'title="&#x27; x&#x27;  policy -0.1000  reference -3.0000  term +2.9000"' in page
    assert "rgba(33,102,172," in page and "rgba(178,24,43," in page  # a raising and a lowering term
    assert "kept right" in page and "<th>round</th>" in page


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def open_in_chromium(page_path, fragment=""):
    """(the DOM after scripts ran, the console lines) of a file opened in headless Chromium."""
    run = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                          "--v=0", "--dump-dom", f"file://{page_path}{fragment}"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, [line for line in run.stderr.splitlines() if "CONSOLE" in line]


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed (Debian: apt install chromium)")
def test_hostile_report_in_chromium(tmp_path):
    """Opened in a browser: no script of the data runs (the title stays), no console error, and the search (here
    from the #q= fragment) shows a hostile prompt as text."""
    rows = [row(k, p, [p, "plain"], [1.0, 0.0]) for k, p in enumerate(HOSTILE)]
    path = tmp_path / "r.html"
    path.write_text(build(rows, title="safe title"))
    dom, console = open_in_chromium(path, "#q=textarea")
    assert "<title>safe title</title>" in dom and "pwned" not in dom.split("</title>")[0]
    assert not [c for c in console if "Uncaught" in c or "rror" in c], console
    results = dom.split('<ol id="results">')[1].split("</ol>")[0]
    assert "&lt;/textarea&gt;&lt;img src=x" in results and "<img" not in results, results
    results = open_in_chromium(path, "#q=bidi")[0].split('<ol id="results">')[1].split("</ol>")[0]
    assert "U+202Eevil" in results and "\u202e" not in results, results


def test_report_command(tmp_path, capsys):
    """python -m minalign.report on a scores file: the page, one line; a finished --out is kept with --resume;
    a bad row is one line naming file:line."""
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps(row(k, f"q{k}", ["a", "bb"], [1.0, -1.0])) + "\n" for k in range(3)))
    out = tmp_path / "r.html"
    assert report.main(["--scores", str(scores), "--out", str(out)]) == 0
    assert "report: 3 prompts" in capsys.readouterr().err and out.read_text().startswith("<!doctype html>")
    assert report.main(["--scores", str(scores), "--out", str(out)]) == 2
    assert "exists (a finished run)" in capsys.readouterr().err
    assert report.main(["--scores", str(scores), "--out", str(out), "--resume"]) == 0
    assert "is complete already" in capsys.readouterr().err
    scores.write_text(scores.read_text() + '{"id": 9, "prompt": "q", "responses": [{"text": "a"}]}\n')
    code = report.main(["--scores", str(scores), "--out", str(tmp_path / "s.html")])
    err = capsys.readouterr().err
    assert code == 2 and f"{scores}:4: a scores row needs" in err and err.count("\n") == 1, err
    code = report.main(["--scores", str(scores), "--out", str(tmp_path / "s.html"), "--metric", "nowhere:f"])
    assert code == 2 and "cannot import 'nowhere'" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(row(k, f"q{k}", ["a", "bb"], [1.0, -1.0])) + "\n" for k in range(3)))
    (tmp_path / "m.json").write_text("[1, 2]")
    for extra, phrase in [(["--metrics", str(tmp_path / "m.json")], "expected a JSON object"),
                          (["--ids", "7"], "--ids: no prompt with id 7"),
                          (["--metric", "minalign.demo:accuracy"], "is not a demo question")]:
        code = report.main(["--scores", str(good), "--out", str(tmp_path / "t.html"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and phrase in err and err.count("\n") == 1, err
    # the loop's: a ground truth that does not fit these prompts is left out, and said
    code = report.main(["--scores", str(good), "--out", str(tmp_path / "t.html"), "--metric", "minalign.demo:accuracy",
                        "--metric-optional"])
    assert code == 0 and "is left out" in capsys.readouterr().err
    assert "is left out" in (tmp_path / "t.html").read_text()
