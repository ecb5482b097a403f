"""Every public op x every CPU backend x (Python API, torch.ops form) on the bad-input
table (tests/bad_input_cases.py): each case must end in a clear exception naming the
argument, or in the reference's result; none may crash, hang or answer wrongly. Each
(family, backend) runs in a child process (a crash there cannot take pytest down) under a
time bound per case and per process."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("bad_input_cases.py")
PROCESS_SECONDS = 1500


@pytest.mark.parametrize("backend", ["reference", "triton", "emu"])
@pytest.mark.parametrize("family", ["quant", "gemm", "mla"])
def test_bad_input_table(family, backend):
    proc = subprocess.run([sys.executable, str(CASES), family, backend], capture_output=True, text=True,
                          timeout=PROCESS_SECONDS, cwd=CASES.parent.parent)
    results, started = [], None
    for line in proc.stdout.splitlines():
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        if "start" in rec:
            started = rec
        else:
            results.append(rec)
            started = None
    assert started is None, (f"{started['start']} ({started['form']}) crashed the process "
                             f"(exit {proc.returncode}): {proc.stderr[-2000:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(results) >= 20, f"only {len(results)} cases ran: {proc.stderr[-2000:]}"
    bad = [f"{r['case']} [{r['form']}]: {r['detail']}" for r in results if r["verdict"] not in ("ok", "n/a")]
    assert not bad, f"{len(bad)} of {len(results)} cases wrong on {backend}:\n" + "\n".join(bad)
