"""The committed gRPC modules are exactly what the .proto generates (run `make proto` if not)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_modules_match_the_proto(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    fresh = gen.generate(tmp_path)
    assert fresh, "no modules generated"
    committed = ROOT / "proto" / "ringserve" / "v1"
    for f in fresh:
        ours = committed / f.name
        assert ours.exists(), f"{ours} is missing: run `make proto` and commit the result"
        assert ours.read_bytes() == f.read_bytes(), f"{ours.name} drifted from the .proto: run `make proto`"

