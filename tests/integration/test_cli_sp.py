"""`ringserve generate --sp 2` prints exactly what `--sp 1` prints for the same greedy request."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def run_cli(*args):
    r = subprocess.run([sys.executable, "-m", "ringserve.cluster.cli", "generate", *args],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_sp2_prints_the_same_tokens_as_sp1(tmp_path):
    doc = tmp_path / "notes.txt"
    doc.write_text("Meeting notes. The launch moved to Thursday because the storage vendor delayed the "
                   "shipment. Maria owns the rollback plan; Tom reviews the billing export. " * 6)
    args = ["--file", str(doc), "--max-tokens", "40", "Who owns the rollback plan, and why did the launch move?"]
    one = run_cli("--sp", "1", *args)
    two = run_cli("--sp", "2", *args)
    assert one.strip() and one == two
