"""The contract's guards bite: `make proto-check` (buf lint, buf breaking against protos/released.binpb) fails on a
removed field and on a lint violation, passes on the committed protos, and the generated code matches them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECOMMEND = Path("protos/specrec/v1/recommend.proto")


@pytest.fixture(scope="module")
def buf() -> str:
    return subprocess.run([str(REPO / "scripts" / "fetch_buf.sh")], capture_output=True, text=True,
                          check=True).stdout.strip()


def copy_of_repo(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "protos", tmp_path / "protos")
    shutil.copy(REPO / "buf.yaml", tmp_path / "buf.yaml")
    return tmp_path


def buf_run(buf: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([buf, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_committed_protos_pass_lint_and_breaking(buf):
    assert buf_run(buf, REPO, "lint").returncode == 0
    assert buf_run(buf, REPO, "breaking", "--against", "protos/released.binpb").returncode == 0


def test_removing_a_released_field_is_caught(buf, tmp_path):
    root = copy_of_repo(tmp_path)
    proto = root / RECOMMEND
    text = proto.read_text()
    assert "  bool strict_history = 5;\n" in text
    proto.write_text(text.replace("  bool strict_history = 5;\n", ""))
    result = buf_run(buf, root, "breaking", "--against", "protos/released.binpb")
    assert result.returncode != 0 and "strict_history" in result.stdout, result.stdout + result.stderr


def test_a_request_shared_between_rpcs_fails_lint(buf, tmp_path):
    root = copy_of_repo(tmp_path)
    proto = root / RECOMMEND
    proto.write_text(proto.read_text().replace("rpc Generate(GenerateRequest)", "rpc Generate(RecommendRequest)"))
    result = buf_run(buf, root, "lint")
    assert result.returncode != 0 and "RecommendRequest" in result.stdout, result.stdout + result.stderr


def test_generated_code_is_up_to_date(tmp_path):
    """`make proto` output committed: regenerating changes nothing."""
    protos = sorted(str(p.relative_to(REPO)) for p in (REPO / "protos").rglob("*.proto"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iprotos",
                    f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos],
                   cwd=REPO, check=True)
    for generated in tmp_path.rglob("*_pb2*.py*"):
        committed = REPO / generated.relative_to(tmp_path)
        assert committed.read_text() == generated.read_text(), f"{committed} is stale: run make proto"
