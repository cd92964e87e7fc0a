"""Generate the Python code of Tandem's protos (messages, type stubs, gRPC stubs).

    python proto/generate.py [--out DIR]

Inputs: every `proto/tandem/**/*.proto`. Output (default: the repository root): the package
`tandem/v1/` with `*_pb2.py`, `*_pb2.pyi` and `*_pb2_grpc.py`. The generated files are committed;
tests/test_protos.py regenerates them into a temporary directory and requires identical bytes, so
they can never drift from the .proto files or from the pinned grpcio-tools.
"""

from __future__ import annotations

import argparse
import importlib.resources
import pathlib
import sys

PROTO_ROOT = pathlib.Path(__file__).resolve().parent
REPO = PROTO_ROOT.parent


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    from grpc_tools import protoc

    sources = sorted(PROTO_ROOT.glob("tandem/**/*.proto"))
    include = importlib.resources.files("grpc_tools") / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *(str(s.relative_to(PROTO_ROOT)) for s in sources)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {[s.name for s in sources]}")
    for package in {s.parent.relative_to(PROTO_ROOT) for s in sources}:
        for level in range(len(package.parts)):  # make tandem/ and tandem/v1/ importable packages
            init = out.joinpath(*package.parts[:level + 1], "__init__.py")
            if not init.exists():
                init.write_text('"""Generated from proto/ by proto/generate.py: do not edit."""\n')
    return sorted(p for p in out.joinpath("tandem").rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=REPO)
    files = generate(parser.parse_args().out)
    print("\n".join(str(f) for f in files), file=sys.stderr)


if __name__ == "__main__":
    main()
