"""Generate the Python modules of proto/ringserve/v1/*.proto (run by `make proto`).

    python scripts/gen_proto.py            # (re)write the *_pb2.py / *_pb2.pyi / *_pb2_grpc.py files
    python scripts/gen_proto.py --check    # exit 1, naming the files, if the committed ones are stale

protoc names a generated module's imports after the .proto's path below the include root. The folder
proto/ is the import package ``ringserve.proto``, so the files are compiled from a temporary tree in
which they sit at ringserve/proto/ringserve/v1/: the modules then import each other as
``ringserve.proto.ringserve.v1.<name>_pb2``, which is where the installed package has them.

Needs grpcio-tools (the ``[test]`` extra); the generated code records the protoc and grpcio versions,
so regenerate with the pinned grpcio-tools to keep the drift test meaningful.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "proto" / "ringserve" / "v1"
PACKAGE_PATH = Path("ringserve", "proto", "ringserve", "v1")  # import path of SRC, as folders
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def is_generated(path: Path) -> bool:
    return path.name.endswith(GENERATED_SUFFIXES)


def generate(out: Path, src: Path = SRC) -> list[Path]:
    """Compile every .proto in ``src``; write the modules into ``out``; return their paths."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(src.glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files in {src}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp, PACKAGE_PATH)
        tree.mkdir(parents=True)
        for p in protos:
            shutil.copyfile(p, tree / p.name)
        args = ["protoc", f"-I{tmp}", f"-I{well_known}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}"] + [str(tree / p.name) for p in protos]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed (its message is above)")
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for f in sorted(tree.iterdir()):
            if is_generated(f):
                shutil.copyfile(f, out / f.name)
                written.append(out / f.name)
    return written


def stale(committed: Path = SRC) -> list[str]:
    """Names of the committed generated files that differ from a fresh generation (or are missing,
    or are left over from a .proto that no longer exists)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {f.name: f.read_bytes() for f in generate(Path(tmp))}
    ours = {f.name: f.read_bytes() for f in committed.iterdir() if is_generated(f)}
    return sorted(name for name in fresh.keys() | ours.keys() if fresh.get(name) != ours.get(name))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only report stale generated files")
    args = ap.parse_args(argv)
    if args.check:
        bad = stale()
        for name in bad:
            print(f"stale: {SRC.relative_to(ROOT) / name}")
        if bad:
            print("run `make proto` and commit the result")
        return 1 if bad else 0
    for f in SRC.iterdir():  # drop modules of .proto files that were removed or renamed
        if is_generated(f) and not (SRC / (f.name.split("_pb2")[0] + ".proto")).exists():
            f.unlink()
            print(f"removed {f.relative_to(ROOT)}")
    for f in generate(SRC):
        print(f"wrote {f.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
