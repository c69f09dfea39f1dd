"""Build tool: generates the Python gRPC stubs from `proto/teacher/v1/teacher.proto`.

The stubs are committed under `services/teacher/pb/` (so a plain `pip install` works without protoc);
`python proto/protogen.py` (`make proto`) regenerates them, and a test fails when the committed copy is stale.
Not part of the runtime package: it needs grpcio-tools (a dev dependency).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent
PROTO_FILE = "teacher/v1/teacher.proto"
PB_DIR = ROOT / "services" / "teacher" / "pb"
PB_PACKAGE = "services.teacher.pb"


def generate(out_dir: Path = PB_DIR) -> list[Path]:
    """Runs protoc (from grpcio-tools) into `out_dir` and rewrites imports to the package path."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_DIR / PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    files = sorted((out_dir / "teacher" / "v1").glob("teacher_pb2*"))
    for path in files:
        text = path.read_text()
        # protoc emits `from teacher.v1 import teacher_pb2`; make it absolute inside our package.
        text = re.sub(r"^from teacher\.v1 import", f"from {PB_PACKAGE}.teacher.v1 import", text, flags=re.M)
        path.write_text(text)
    for pkg in (out_dir, out_dir / "teacher", out_dir / "teacher" / "v1"):
        init = pkg / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated gRPC stubs (make proto); do not edit."""\n')
    return files


if __name__ == "__main__":
    for f in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PB_DIR):
        print(f)
