"""The long fuzz campaign (not run in CI): every fuzzer of tests/test_fuzz*.py again and again, fresh random inputs
each run, until every RPC it drives had --per-rpc inputs, against one real stack; writes
bench/results/fuzz-campaign-<date>.md.

    python bench/fuzz_campaign.py                 # >= 10,000 inputs per RPC (about an hour on 2 cores)
    python bench/fuzz_campaign.py --per-rpc 300   # a few minutes

Passes when pytest does: no crash, a documented status with a message for every input, the servers alive, and the
witnesses (a draft stream, Recommend calls, a Triton sequence, an in-process verifier row) unchanged beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from reliability import FUZZ_TESTS, RESULTS, pytest  # noqa: E402  (bench/reliability.py)

SUMMARY_LINES = ("Speculate statuses:", "raw bytes statuses:", "Recommender statuses:", "verifier fuzz:",
                 "triton fuzz:")


def inputs_per_rpc(log: str) -> dict[str, int]:
    """The fuzz modules' own counts ("examples per RPC: name n, ..."), summed over modules."""
    counts: dict[str, int] = {}
    for line in re.findall(r"examples per RPC: (.*)", log):
        for name, n in re.findall(r"(.+?) (\d+)(?:, |$)", line):
            counts[name] = counts.get(name, 0) + int(n)
    for kind, pattern in (("in-process verifier (batches)", r"verifier fuzz: (\d+) batches"),
                          ("Triton ModelInfer (raw tensors)", r"triton fuzz: (\d+) infer calls")):
        if m := re.search(pattern, log):
            counts[kind] = int(m.group(1))
    return counts


def markdown(date: str, command: str, code: int, summary: str, minutes: float, log: str) -> str:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    counts = inputs_per_rpc(log)
    lines = [ln.strip() for ln in log.splitlines() if ln.strip().startswith(SUMMARY_LINES)]
    out = [f"# Fuzz campaign, {date}", "",
           f"Command: `{command}` ({minutes:.0f} min, {os.cpu_count()} cores; code `{rev}`)", "",
           f"Result: **{'passed' if code == 0 else 'FAILED'}** ({summary})", "",
           "| RPC | inputs |", "|---|---|", *(f"| {name} | {n:,} |" for name, n in sorted(counts.items())), "",
           "Statuses and witnesses, as the fuzzers print them:", "", *(f"- {ln}" for ln in lines)]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-rpc", type=int, default=10_000, help="inputs each RPC gets at least (default 10000)")
    args = p.parse_args(argv)
    command = f"python bench/fuzz_campaign.py --per-rpc {args.per_rpc}"
    work = Path(tempfile.mkdtemp(prefix="specrec-fuzz-campaign-"))
    paths = sorted(str(q.relative_to(ROOT)) for q in ROOT.glob(FUZZ_TESTS))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPECREC_FUZZ_PER_RPC": str(args.per_rpc)}
    print(f"fuzzing {', '.join(paths)} to {args.per_rpc} inputs per RPC; log {work / 'fuzz.log'}", flush=True)
    code, summary, seconds = pytest(["--timeout=0", *paths], env, work / "fuzz.log")  # a fuzzer runs for many minutes
    date = dt.date.today().isoformat()
    text = markdown(date, command, code, summary, seconds / 60, (work / "fuzz.log").read_text(errors="replace"))
    out = RESULTS / f"fuzz-campaign-{date}.md"
    out.write_text(text)
    print(text)
    print(f"written {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
