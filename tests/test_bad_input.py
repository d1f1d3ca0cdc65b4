"""Bad input through the real command lines: each case exits with status 2 and one stderr line naming the file,
line or key at fault, and changes nothing already written (no output, no partial file, every file as it was).

One tiny checkpoint is built per module; every case corrupts its own copy of the whole setup. The cases run as
`python sample.py ...` / `python score.py ...`, each in its own process, forked from one interpreter that imported
the stages once (a fresh interpreter costs ~2 s a case on 2 cores); test_forked_run_is_the_plain_command checks
that the fork changes nothing.
"""
import json
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import minalign
from tests.test_checkpoint import set_config
from tests.test_sample_cli import ENV, ROOT

# Reads [[script, argv, stderr file], ...] on stdin; prints the exit status of each run, as the shell sees it.
# A run that goes on too long (memory growing without bound, on code that does not stop it) is ended by an alarm
# (status -14), and an address-space limit stops it from taking the machine's memory first.
DRIVER = r"""
import json, os, resource, runpy, signal, sys, traceback
import minalign.sample, minalign.score
codes = []
for script, argv, err in json.load(sys.stdin):
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        signal.alarm(20)
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
        sys.argv = [script, *argv]
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(codes))
"""

GOOD_PROMPT = '{"prompt": "hello"}'
GOOD_SAMPLE = json.dumps({"id": 1, "prompt": "hello", "responses": [
    {"text": "hi", "token_ids": [5, 6, 2], "logprobs": [-1.0, -1.0, -1.0], "finish_reason": "stop"}]})
WEIGHTS = "{d}/model/model.safetensors"
CONFIG = "{d}/model/config.json"
INDEX = "{d}/sharded/model.safetensors.index.json"


# --- corruptions: functions of the case dir -------------------------------------------------------------------

def config(rel: str = "model", **changes) -> Callable[[Path], None]:
    """Change keys of <rel>/config.json (a value of ... removes the key)."""
    return lambda d: set_config(d / rel, **changes)


def write(rel: str, data: bytes | str | Callable[[bytes], bytes]) -> Callable[[Path], None]:
    """Replace file rel by data, or by data(its bytes)."""
    def corrupt(d: Path):
        path = d / rel
        new = data(path.read_bytes()) if callable(data) else data
        path.write_bytes(new.encode() if isinstance(new, str) else new)
    return corrupt


def past_the_end(data: bytes) -> bytes:
    """A safetensors file whose last tensor ends 4 bytes after the file does (the header rewritten, the data kept)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    last = max((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][1])
    last["data_offsets"][1] += 4
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def retype(key: str, dtype: torch.dtype) -> Callable[[Path], None]:
    """Store tensor key of the model in another dtype."""
    def corrupt(d: Path):
        path = d / "model" / "model.safetensors"
        weights = load_file(path)
        save_file({**weights, key: weights[key].to(dtype)}, path, metadata={"format": "pt"})
    return corrupt


def rows(rel: str, *lines: str) -> Callable[[Path], None]:
    """Replace a JSONL file by these lines."""
    return write(rel, "".join(line + "\n" for line in lines))


@dataclass
class Case:
    id: str
    cli: str  # "sample" (--model d/<model>) or "score" (--policy d/model --reference d/reference)
    corrupt: Callable[[Path], None]
    culprit: tuple[str, ...]  # what the one error line must name ({d}: the case dir)
    model: str = "model"

    def param(self):
        """This case as a pytest parameter."""
        return pytest.param(self, id=self.id)


CASES = [
    # safetensors files
    Case("weights-empty", "sample", write("model/model.safetensors", b""), (WEIGHTS, "0 bytes")),
    Case("weights-truncated-data", "sample", write("model/model.safetensors", lambda b: b[:-100]),
                 (WEIGHTS, "not fully covered")),
    Case("weights-truncated-header", "sample", write("model/model.safetensors", lambda b: b[:40]),
                 (WEIGHTS, "header claims")),
    Case("weights-header-longer-than-file", "sample",
                 write("model/model.safetensors", lambda b: struct.pack("<Q", len(b) + 1000) + b[8:]),
                 (WEIGHTS, "header claims")),
    Case("weights-header-not-json", "sample",
                 write("model/model.safetensors", lambda b: b[:8] + b"\xff" * 16 + b[24:]), (WEIGHTS, "UTF-8")),
    Case("weights-offset-past-end", "sample", write("model/model.safetensors", past_the_end),
                 (WEIGHTS, "offset")),
    Case("weights-int8", "sample", retype("model.norm.weight", torch.int8),
                 (WEIGHTS, "model.norm.weight", "I8")),
    Case("weights-bool", "sample", retype("model.layers.1.mlp.up_proj.weight", torch.bool),
                 (WEIGHTS, "model.layers.1.mlp.up_proj.weight", "BOOL")),
    Case("weights-reference-truncated", "score", write("reference/model.safetensors", lambda b: b[:-100]),
                 ("{d}/reference/model.safetensors",)),
    # config.json
    Case("config-a-list", "sample", write("model/config.json", "[1, 2]"), (CONFIG, "object")),
    Case("config-not-utf8", "sample", write("model/config.json", b'{"model_type": "\xff"}'), (CONFIG, "UTF-8")),
    Case("config-string-size", "sample", config(hidden_size="64"), (CONFIG, "hidden_size")),
    Case("config-zero-heads", "sample", config(num_attention_heads=0), (CONFIG, "num_attention_heads")),
    Case("config-zero-kv-heads", "score", config("reference", num_key_value_heads=0),
         ("{d}/reference/config.json", "num_key_value_heads")),
    Case("config-float-layers", "sample", config(num_hidden_layers=2.5), (CONFIG, "num_hidden_layers")),
    Case("config-negative-vocab", "score", config(vocab_size=-1), (CONFIG, "vocab_size")),
    Case("config-bool-size", "sample", config(intermediate_size=True), (CONFIG, "intermediate_size")),
    Case("config-heads-do-not-divide", "sample", config(head_dim=..., num_attention_heads=3, num_key_value_heads=1),
         (CONFIG, "num_attention_heads", "hidden_size")),
    Case("config-nan-eps", "sample", write("model/config.json", lambda b: b.replace(b'"rms_norm_eps": 1e-05',
                                                                                     b'"rms_norm_eps": NaN')),
         (CONFIG, "rms_norm_eps")),
    Case("config-rope-parameters-not-object", "sample", config(rope_parameters=5), (CONFIG, "rope_parameters")),
    Case("config-empty-eos-list", "sample", config(eos_token_id=[]), (CONFIG, "eos_token_id")),
    Case("config-zero-sliding-window", "sample", config(sliding_window=0), (CONFIG, "sliding_window")),
    Case("config-1e9-layers", "sample", config(num_hidden_layers=10**9),
                 (CONFIG, "num_hidden_layers", "2 layers")),
    Case("config-1e9-experts", "sample", config(model_type="mixtral", num_local_experts=10**9),
                 (CONFIG, "num_local_experts")),
    # model.safetensors.index.json
    Case("index-weight-map-a-list", "sample",
                 write("sharded/model.safetensors.index.json", '{"weight_map": ["model.norm.weight"]}'),
                 (INDEX, "weight_map"), model="sharded"),
    Case("index-shard-name-a-number", "sample",
                 write("sharded/model.safetensors.index.json", '{"weight_map": {"model.norm.weight": 5}}'),
                 (INDEX, "model.norm.weight"), model="sharded"),
    # prompts.jsonl (sample.py) and samples.jsonl (score.py)
    Case("prompt-lone-surrogate", "sample", rows("prompts.jsonl", GOOD_PROMPT, r'{"prompt": "a\ud800b"}'),
         ("{d}/prompts.jsonl:2", "surrogate")),
    Case("prompt-deep-nesting", "sample",
         rows("prompts.jsonl", GOOD_PROMPT, '{"prompt": "a", "source": ' + "[" * 10**5 + "]" * 10**5 + "}"),
         ("{d}/prompts.jsonl:2", "nested")),
    # read, but too deep to write from further down the stack: a traceback after sampling, once
    Case("prompt-nesting-986", "sample",
         rows("prompts.jsonl", GOOD_PROMPT, '{"prompt": "a", "source": ' + "[" * 986 + "]" * 986 + "}"),
         ("{d}/prompts.jsonl:2", "nested")),
    Case("prompt-source-nan", "sample", rows("prompts.jsonl", GOOD_PROMPT, '{"prompt": "a", "source": NaN}'),
         ("{d}/prompts.jsonl:2", "NaN")),
    Case("prompt-source-infinity", "sample", rows("prompts.jsonl", '{"prompt": "a", "source": -Infinity}'),
         ("{d}/prompts.jsonl:1", "Infinity")),
    Case("prompt-source-1e999", "sample", rows("prompts.jsonl", GOOD_PROMPT, '{"prompt": "a", "source": 1e999}'),
         ("{d}/prompts.jsonl:2", "1e999")),
    Case("prompt-5000-digit-id", "sample", rows("prompts.jsonl", '{"prompt": "a", "id": ' + "7" * 5000 + "}"),
         ("{d}/prompts.jsonl:1", "digits")),
    Case("samples-lone-surrogate", "score", rows("samples.jsonl", GOOD_SAMPLE.replace('"hi"', r'"\udc00"')),
         ("{d}/samples.jsonl:1", "surrogate")),
    Case("samples-logprob-nan", "score",
         rows("samples.jsonl", GOOD_SAMPLE, GOOD_SAMPLE.replace("-1.0", "NaN").replace('"id": 1', '"id": 2')),
         ("{d}/samples.jsonl:2", "NaN")),
]


def argv(case: Case, d: Path) -> list[str]:
    """The command line of a case: its output d/out.jsonl, an earlier one that --overwrite would replace."""
    if case.cli == "sample":
        return ["sample.py", "--model", str(d / case.model), "--prompts", str(d / "prompts.jsonl"), "--out",
                str(d / "out.jsonl"), "--overwrite", "--template", "mistral", "-n", "1", "--max-new-tokens", "2"]
    return ["score.py", "--samples", str(d / "samples.jsonl"), "--policy", str(d / "model"), "--policy-template",
            "mistral", "--reference", str(d / "reference"), "--reference-template", "mistral", "--out",
            str(d / "out.jsonl"), "--overwrite"]


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under d, by relative path."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mistral_tokenizer_dir):
    """{case id: (case dir, its files before the run, exit status, stderr)}: every case run once, in one driver."""
    good = tmp_path_factory.mktemp("good")
    for name in ("model", "reference", "sharded"):
        shutil.copytree(mistral_tokenizer_dir, good / name)
    cfg = minalign.get_config("tiny-mistral", vocab_size=minalign.load_tokenizer(good / "model").vocab_size)
    model = minalign.Transformer(cfg).init_weights(seed=0)
    minalign.save_model(model, good / "model")
    minalign.save_model(model, good / "reference")
    minalign.save_model(model, good / "sharded", max_shard_size=100_000)
    (good / "prompts.jsonl").write_text(GOOD_PROMPT + "\n")
    (good / "samples.jsonl").write_text(GOOD_SAMPLE + "\n")
    (good / "out.jsonl").write_text("an earlier output, to be left alone\n")
    dirs, jobs = {}, []
    for case in CASES:
        d = tmp_path_factory.mktemp(case.id)
        shutil.copytree(good, d, dirs_exist_ok=True)
        case.corrupt(d)
        dirs[case.id] = d, snapshot(d)
        script, *args = argv(case, d)
        jobs.append([script, args, str(d.parent / f"{case.id}.stderr")])
    done = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(jobs), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return {case.id: (*dirs[case.id], code, Path(err).read_text())
            for case, code, (_, _, err) in zip(CASES, json.loads(done.stdout), jobs)}


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_input_is_one_line_status_2_and_changes_nothing(runs, case):
    d, before, code, err = runs[case.id]
    assert code == 2, f"status {code}:\n{err[-3000:]}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{case.cli}.py: error: "), err[-3000:]
    for needle in case.culprit:
        assert needle.format(d=d) in lines[0], f"{needle.format(d=d)!r} not named in: {lines[0]}"
    after = snapshot(d)
    assert after.keys() == before.keys(), f"files appeared or went: {sorted(after.keys() ^ before.keys())}"
    assert [k for k in before if after[k] != before[k]] == [], "files changed"


def test_forked_run_is_the_plain_command(runs):
    """A case run by the driver gives what `python sample.py ...` gives: the same status and stderr."""
    case = next(c for c in CASES if c.id == "config-zero-heads")
    d, _, code, err = runs[case.id]
    plain = subprocess.run([sys.executable, *argv(case, d)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=120)
    assert (plain.returncode, plain.stderr) == (code, err)
