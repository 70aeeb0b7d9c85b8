"""The bench scripts (bench/, run as ``python bench/bench_x.py``): a killed bench leaves no work
directory behind (a SmolLM2 ppo bench's is ~8 GB)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import subprocess_env

REPO = Path(__file__).resolve().parent.parent


def test_a_bench_stopped_by_sigterm_removes_its_work_directory(tmp_path):
    """SIGTERM (``timeout``, a killed job) while the bench trains: its ``finally`` still runs, so the
    work directory in TMPDIR is gone and the exit status is 128 + SIGTERM."""
    cmd = [sys.executable, str(REPO / "bench" / "bench_sft.py"), "--size", "tiny", "--steps", "3000", "--rounds", "1"]
    proc = subprocess.Popen(cmd, env=subprocess_env(TMPDIR=str(tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)  # fmt: skip
    try:
        deadline = time.time() + 120
        # rlhfkit's run directory: training has begun (3,000 steps of the tiny model take minutes)
        while not list(tmp_path.glob("bench-sft-*/out-rlhfkit")):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < deadline, "the bench never started training"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert not list(tmp_path.glob("bench-sft-*"))
