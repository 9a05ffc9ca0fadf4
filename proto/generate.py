"""Regenerates the Python stubs of the API (`python -m splitserve.proto.generate [OUT_DIR]`).

The .proto is compiled as `splitserve/proto/v1/inference.proto`, so the generated modules import each other as
`splitserve.proto.v1...` and the descriptor carries the package path that reflection reports."""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ("v1/inference.proto",)
OUTPUTS = ("v1/inference_pb2.py", "v1/inference_pb2.pyi", "v1/inference_pb2_grpc.py")


def generate(out_dir: Path = HERE) -> list[Path]:
    """Compiles the sources and writes OUTPUTS under out_dir (the package folder by default)."""
    from grpc_tools import protoc  # a build/test dependency (grpcio-tools), not needed at run time

    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for src in SOURCES:
            dst = root / "splitserve" / "proto" / src
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(HERE / src, dst)
        rel = [f"splitserve/proto/{s}" for s in SOURCES]
        args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={root}", f"--pyi_out={root}",
                f"--grpc_python_out={root}", *rel]
        code = protoc.main(args)
        if code != 0:
            raise RuntimeError(f"protoc failed with exit code {code}: {' '.join(args)}")
        written = []
        for out in OUTPUTS:
            target = Path(out_dir) / out
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / "splitserve" / "proto" / out, target)
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(path)
