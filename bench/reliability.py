"""Reliability report: load held, faults survived, inputs fuzzed, requests lost (must be 0), in one command.

Runs the fault scenarios (pytest tests/chaos, real processes; each appends its counts to a JSON-lines file
through SPECREC_CHAOS_REPORT), then bench/load.py's levels and soak, then the fuzz tests if this checkout has
them, and writes bench/results/reliability-<date>[-quick].md.

    python bench/reliability.py            # all fault scenarios; levels 1,4,16,64 + 128; soak 2000 (or 300 s)
    python bench/reliability.py --quick    # fewer faults; levels 1,4,16 + 32 (cap 16); soak 300
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import load  # noqa: E402  (bench/load.py)

RESULTS = ROOT / "bench" / "results"
# --quick keeps one malformed-tree fault and the stub kill (which exercises the same restart as the server kill)
QUICK_SKIP = "not (unknown_tokens or length_mismatch or oversized or illegal_tokens or stream_error or tritonserver)"
FUZZ_TESTS = "tests/test_fuzz*.py"  # the input fuzzers (issue #9 item 4), where this checkout has them


def pytest(paths: list[str], env: dict[str, str], log: Path) -> tuple[int, str, float]:
    """Run pytest in a subprocess (its output to `log`); (exit code, its summary line, seconds)."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *paths],
                              cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    return code, (lines[-1].strip("= ") if lines else "no summary"), time.perf_counter() - t0


def chaos(work: Path, quick: bool) -> dict:
    rows_path = work / "chaos.jsonl"
    env = {**os.environ, "SPECREC_CHAOS_REPORT": str(rows_path), "PYTHONPATH": str(ROOT),
           "SPECREC_TORCH_THREADS": "1"}
    code, summary, seconds = pytest(["tests/chaos", *(["-k", QUICK_SKIP] if quick else [])], env, work / "chaos.log")
    rows = [json.loads(ln) for ln in rows_path.read_text().splitlines()] if rows_path.exists() else []
    return {"exit": code, "summary": summary, "seconds": seconds, "rows": rows, "log": str(work / "chaos.log")}


def fuzz(work: Path) -> dict:
    paths = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(FUZZ_TESTS))
    if not paths:
        return {"summary": "no fuzz tests in this checkout", "exit": 0, "paths": []}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPECREC_TORCH_THREADS": "1"}
    code, summary, seconds = pytest(paths, env, work / "fuzz.log")
    return {"summary": summary, "exit": code, "paths": paths, "seconds": seconds}


def load_rows(ld: dict) -> list[str]:
    below = [r for r in ld["levels"] if not r["above_cap"]]
    above = [r for r in ld["levels"] if r["above_cap"]]
    held = all(r["completed"] == r["sent"] for r in below)
    p99 = ", ".join(f"{r['p99_ms']:.0f}" for r in below)
    refused = sum(r["codes"].get("RESOURCE_EXHAUSTED", 0) for r in above)
    hinted = sum(r["refused_with_hint"] for r in above)
    rows = [f"| load held | {'yes' if held else 'NO'}: no error below the cap at concurrency "
            f"{', '.join(str(r['concurrency']) for r in below)} (p99 {p99} ms); above it at "
            f"{', '.join(str(r['concurrency']) for r in above)}: {refused} refusals, {hinted} with a retry hint |"]
    soak = ld.get("soak")
    if soak:
        growth = ", ".join(f"{k} {m['growth_pct']:+.1f}% ({m['before']:.0f} -> {m['after']:.0f} MB)"
                           for k, m in soak["rss_mb"].items())
        rows.append(f"| soak | {soak['completed']}/{soak['sent']} completed; RSS {growth} |")
    return rows


def campaign_note() -> str:
    """The last long fuzz campaign (bench/fuzz_campaign.py), which this report does not rerun."""
    reports = sorted(RESULTS.glob("fuzz-campaign-*.md"))
    if not reports:
        return ""
    result = next((ln for ln in reports[-1].read_text().splitlines() if ln.startswith("Result:")), "Result: ?")
    return f"; long campaign ({reports[-1].name}): {result.removeprefix('Result: ')}"


def markdown(report: dict) -> str:
    c, ld, fz = report["chaos"], report["load"], report["fuzz"]
    soak = ld.get("soak")
    lost = sum(r["lost"] for r in c["rows"]) + sum(r["lost"] for r in ld["levels"]) + (soak["lost"] if soak else 0)
    survived = sum(r["lost"] == 0 for r in c["rows"])
    out = [f"# Reliability, {report['date']}", "",
           f"Command: `{report['command']}` ({report['minutes']:.1f} min, {report['machine']})", "",
           "| check | result |", "|---|---|", *load_rows(ld),
           f"| faults survived | {survived}/{len(c['rows'])} scenarios lost nothing; "
           f"pytest tests/chaos: {c['summary']} |",
           f"| inputs fuzzed | {fz['summary']}{campaign_note()} |",
           f"| requests lost (must be 0) | **{lost}** |", "",
           "## Faults", "",
           "| scenario | sent | completed (= reference) | clear errors | cancelled | hung | wrong | lost |",
           "|---|---|---|---|---|---|---|---|"]
    for r in c["rows"]:
        errors = ", ".join(f"{k} {v}" for k, v in r["codes"].items() if k not in ("OK", "CANCELLED")) or "0"
        out.append(f"| {r['scenario']} | {r['sent']} | {r['completed']} | {errors} | {r['cancelled']} | {r['hung']} |"
                   f" {r['wrong']} | {r['lost']} |")
    out += ["", "## Load", "", load.markdown(ld).split("\n", 4)[4]]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--profile", default="tiny")
    args = p.parse_args(argv)
    command = "python bench/reliability.py" + (" --quick" if args.quick else "")
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="specrec-reliability-"))
    print(f"fault scenarios (pytest tests/chaos), log {work / 'chaos.log'}", flush=True)
    report = {"date": dt.date.today().isoformat(), "command": command, "chaos": chaos(work, args.quick)}
    print(f"  {report['chaos']['summary']}", flush=True)
    # The soak stops at 2000 requests or 300 s, whichever comes first (the report says how many were sent).
    load_argv = ["--profile", args.profile, "--soak-seconds", "300"] + (
        ["--quick", "--soak", "300"] if args.quick else ["--soak", "2000", "--soak-concurrency", "16"])
    report["load"] = load.run(load.parse_args(load_argv), "python bench/load.py " + " ".join(load_argv))
    report["fuzz"] = fuzz(work)
    report["minutes"] = (time.perf_counter() - t0) / 60
    report["machine"] = f"{os.cpu_count()} cores, load average at the end {os.getloadavg()[0]:.1f}"
    out = RESULTS / f"reliability-{report['date']}{'-quick' if args.quick else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    print(text)
    print(f"written {out}")
    failed = report["chaos"]["exit"] != 0 or report["fuzz"]["exit"] != 0 or "**0**" not in text
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
