"""benchmarks/gpu_check.py without a GPU: it refuses cleanly (status 2, a message naming the cause, no traceback,
no results file), and its dry run executes every section on tiny shapes under Triton's interpreter in a process
where Ray cannot be imported, and records the sections' results."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
NO_RAY = "import runpy, sys; sys.modules['ray'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def run(*args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", NO_RAY, str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without CUDA")
def test_exits_cleanly_without_cuda(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = run("--out", str(out), timeout=120)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


@pytest.mark.slow
def test_cpu_dry_run_runs_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = run("--cpu-dry-run", "--out", str(out), timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["complete"] and results["errors"] == [] and results["correctness_failures"] == []
    assert {r["kernel"].split()[0] for r in results["bandwidth"]} == {"add_rmsnorm", "paged"}
    engine = {(r["model"], r["attention"], r["batch"]) for r in results["engine"]}
    assert engine == {(m, a, b) for m in ("tiny", "llama-mini-shape") for a in ("triton", "torch") for b in (1, 2)}
    assert all(r["decode_tokens_per_s"] > 0 and r["roofline_tokens_per_s"] > 0 for r in results["engine"])
    assert [(r["model"], r["identical"]) for r in results["parity"]] == [("tiny", 5), ("mistral", 5)]
    assert "transformers parity" in done.stdout
