"""The GPU benchmark's `--tiny` mode runs the same code as on the GPU, on the CPU in seconds, so it cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_tiny_runs_every_stage_and_writes_its_table(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--out", str(out),
                              "--work-dir", str(tmp_path / "work")], capture_output=True, text=True, env=env,
                             timeout=600, check=False)
    assert process.returncode == 0, process.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["shape"] == "tiny" and figures["device"] == "cpu"
    # Every candidate was scored for induce (score_all), and the ones selection scores got bypass and KL too.
    assert figures["n_induce"] == figures["n_candidates"] > 0 and 0 < figures["n_scored"] <= figures["n_candidates"]
    assert figures["candidates_per_s"] > 0 and figures["selection_over_floor"] > 0
    # The tiny Llama has 2 layers: o_proj and down_proj of each, and the embedding.
    assert figures["n_edited"] == 5 and figures["apply_gb_per_s"] > 0 and figures["copy_gb_per_s"] > 0
    assert figures["transformers_tokens"] == 4 * 8  # 4 prompts, 8 new tokens each, no early stop
    for key in ("measure_s", "apply_over_copy", "transformers_tokens_per_s", "total_s"):
        assert f"| {key:<28} |" in process.stdout
    assert not (tmp_path / "work").exists()  # the model and its outputs are removed without --keep
