"""Time to load the default model (SmolLM2-135M GGUF) to a ready fp32 CPU model: ringserve's loader against
transformers' GGUF loading (what a user of transformers runs) and against ringserve's own loader reading
the metadata through the `gguf` package's GGUFReader (the loader before it read the file itself).

Each is run in a fresh Python process (no warm imports or caches shared between them), --repeats times,
interleaved; the figure is the median wall time of the load call itself (imports excluded, reported apart).
Every rank of a group, every `ringserve generate` and the Gateway (tokenizer, context limit) pay this load.

    .venv/bin/python benchmarks/load_model.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys

CASES = {
    "ringserve": """
import time; t0 = time.perf_counter()
from ringserve.workers.loader import load_model
t1 = time.perf_counter(); m = load_model("default"); t2 = time.perf_counter()
""",
    "ringserve+GGUFReader": """
import time; t0 = time.perf_counter()
import gguf
from ringserve.workers import loader
def _reader(path):
    r = gguf.GGUFReader(str(path))
    class F:  # the package's reader, seen through the loader's interface (fields as python values)
        fields = {k: f.contents() for k, f in r.fields.items()}
        tensors = r.tensors
    return F
loader.read_gguf_file = _reader
t1 = time.perf_counter(); m = loader.load_model("default"); t2 = time.perf_counter()
""",
    "transformers": """
import time; t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
from ringserve.workers.loader import default_model_path
p = default_model_path()
t1 = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
t2 = time.perf_counter()
""",
}
TAIL = "\nimport json; print(json.dumps({'import_s': t1 - t0, 'load_s': t2 - t1}))\n"


def run(case: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CASES[case] + TAIL], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    res: dict[str, list[dict]] = {c: [] for c in CASES}
    for _ in range(args.repeats):
        for c in CASES:
            res[c].append(run(c))
    import gguf
    import torch
    import transformers

    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"gguf {getattr(gguf, '__version__', '?')}, {platform.machine()}, median of {args.repeats}\n")
    ours = statistics.median(r["load_s"] for r in res["ringserve"])
    print("| loader | load (s) | imports (s) | ringserve is faster by |")
    print("|---|---:|---:|---:|")
    for c, rs in res.items():
        load = statistics.median(r["load_s"] for r in rs)
        imp = statistics.median(r["import_s"] for r in rs)
        print(f"| {c} | {load:.2f} | {imp:.2f} | {load / ours:.1f}x |")


if __name__ == "__main__":
    main()
