"""Generates the Python modules for tunnel.proto (run by `make proto`; a test checks they are fresh).

Run as `python -m fieldline.shared.proto.codegen [OUT_DIR]`; needs grpcio-tools (the dev extra).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
GENERATED = ("tunnel_pb2.py", "tunnel_pb2.pyi", "tunnel_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile tunnel.proto into out_dir and return the generated files."""
    from grpc_tools import protoc  # dev-only dependency

    with tempfile.TemporaryDirectory() as tmp:
        # Lay the proto out under its package path so the generated grpc module imports
        # "from fieldline.shared.proto import tunnel_pb2" instead of a bare top-level name.
        src_root = Path(tmp) / "src"
        pkg = src_root / "fieldline" / "shared" / "proto"
        pkg.mkdir(parents=True)
        shutil.copy(PROTO_DIR / "tunnel.proto", pkg / "tunnel.proto")
        gen_root = Path(tmp) / "gen"
        gen_root.mkdir()
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{src_root}",
                f"--python_out={gen_root}",
                f"--pyi_out={gen_root}",
                f"--grpc_python_out={gen_root}",
                str(pkg / "tunnel.proto"),
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            target = out_dir / name
            shutil.copy(gen_root / "fieldline" / "shared" / "proto" / name, target)
            written.append(target)
        return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR
    for path in generate(out):
        print(path)
