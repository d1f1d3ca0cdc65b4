"""bench/gpu.py --smoke: every part of the GPU benchmark at toy sizes on the CPU, so the script cannot rot before a
GPU runs it (its figures mean nothing; the kernels part's errors are checked all the same)."""
import json
import subprocess
import sys

from tests.test_sample_cli import ENV, ROOT


def test_gpu_script_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--repeats", "1", "--out",
                          str(out)], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["parts"]) == {"kernels", "logprob", "decode", "train"}
    kernels = results["parts"]["kernels"]
    assert len(kernels) == 12 and all(r["ok"] for r in kernels), kernels
    assert {r["provider"] for r in results["parts"]["logprob"]} == {"naive", "chunked", "fused"}
    assert all(r["tokens_per_s"] > 0 for r in results["parts"]["decode"] + results["parts"]["train"])
    table = out.with_suffix(".md").read_text()
    assert "**kernels**" in table and "kernel_error" in table
