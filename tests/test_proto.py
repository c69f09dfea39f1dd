"""The committed gRPC stubs in services/teacher/pb are exactly what `make proto` (proto/protogen.py) generates
from the .proto."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the stubs")

ROOT = Path(__file__).resolve().parents[1]


def _protogen():
    """The build tool, loaded from its file (it lives under proto/, outside the runtime packages)."""
    spec = importlib.util.spec_from_file_location("protogen", ROOT / "proto" / "protogen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


protogen = _protogen()


def test_committed_stubs_are_not_stale(tmp_path: Path):
    generated = protogen.generate(tmp_path)
    names = sorted(p.name for p in generated)
    assert names == ["teacher_pb2.py", "teacher_pb2.pyi", "teacher_pb2_grpc.py"]
    committed_dir = protogen.PB_DIR / "teacher" / "v1"
    stale = [p.name for p in generated if p.read_text() != (committed_dir / p.name).read_text()]
    assert not stale, f"stale stubs {stale}: run `make proto` and commit services/teacher/pb"
    for pkg in ("", "teacher", "teacher/v1"):
        assert (protogen.PB_DIR / pkg / "__init__.py").exists()


def test_stubs_import_from_the_package():
    """The generated modules import each other through the package path (no top-level `teacher` module)."""
    from services.teacher.pb.teacher.v1 import teacher_pb2, teacher_pb2_grpc

    text = (protogen.PB_DIR / "teacher" / "v1" / "teacher_pb2_grpc.py").read_text()
    assert "from services.teacher.pb.teacher.v1 import teacher_pb2" in text
    service = teacher_pb2.DESCRIPTOR.services_by_name["Teacher"]
    assert service.full_name == "teacher.v1.Teacher"
    assert sorted(m.name for m in service.methods) == ["GetModelInfo", "Score", "ScoreStream"]
    stream = service.methods_by_name["ScoreStream"]
    assert stream.client_streaming and stream.server_streaming
    assert hasattr(teacher_pb2_grpc, "TeacherServicer") and hasattr(teacher_pb2_grpc, "TeacherStub")
