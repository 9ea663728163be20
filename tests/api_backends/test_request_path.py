"""The layering of one request, as ``benchmarks/trace_calls.py`` traces it
(docs/architecture.md): on each thread every layer is entered at most twice, once on the way down
and once on the way back. A change that calls back into a layer it already left fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_one_run_inference_enters_each_layer_once_down_and_once_back() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trace_calls.py")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = run.stdout
    verdicts = [line.strip() for line in out.splitlines() if "once down and once back" in line]
    assert len(verdicts) == 2, out + run.stderr  # the caller's thread and the client's loop
    assert all(v.endswith(": yes") for v in verdicts), out
    assert run.returncode == 0, out + run.stderr
    # the loop's path reaches the wire, and comes back through the breaker's verdict
    assert "attempt -> transport" in out and "attempt -> breaker    record_success" in out
