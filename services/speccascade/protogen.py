"""Generate Python code for proto/speccascade/v1/*.proto with grpcio-tools (never hand-edited).

Run by setup.py on every build, by `make proto`, and by the staleness test, which regenerates into a
temporary folder and compares.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "services"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO_DIR)) for p in proto_files()]
    code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}",
                        f"--python_out={out_dir}", f"--pyi_out={out_dir}",
                        f"--grpc_python_out={out_dir}", *files])
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code} for {files}")
    return sorted(Path(out_dir).rglob("*_pb2*.py*"))


if __name__ == "__main__":
    for path in generate():
        print(path)
