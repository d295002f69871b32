"""The README's client examples run as written (the address aside) against the real stack: the Python client
block and the grpcurl call (real grpcurl, reading the API by server reflection)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from harness.stack import LocalStack, StackConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
MAKE_RUN_ADDR = "127.0.0.1:50051"


@pytest.fixture(scope="module")
def stack(tiny_artifacts, tiny_drafter):
    with LocalStack(StackConfig(artifacts=tiny_artifacts.directory)) as running:
        yield running


def test_the_python_client_block_prints_a_scored_filtered_list(stack):
    block = README.split("<!-- readme-client:", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert MAKE_RUN_ADDR in block and len(block.strip().splitlines()) <= 11
    out = subprocess.run([sys.executable, "-c", block.replace(MAKE_RUN_ADDR, stack.orchestrator_addr)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    items = [line.split()[0] for line in lines[:-1]]
    assert len(items) == 5 and "100" not in items  # the deny filter held
    assert all(float(line.split()[1]) < 0 for line in lines[:-1])
    assert lines[-1] == "readme-1 unknown history items skipped: 1"


def test_the_grpcurl_call_answers(stack):
    command = re.search(r"\.venv/bin/grpcurl .*?Recommend\n", README, re.S)
    assert command, "no grpcurl call in the README"
    args = shlex.split(command.group(0).replace("\\\n", " ").replace(MAKE_RUN_ADDR, stack.orchestrator_addr))
    out = subprocess.run([str(REPO / args[0]), *args[1:]], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    response = json.loads(out.stdout)
    assert len(response["items"]) == 3 and response.get("request_id", response.get("requestId")) == "try-1"
