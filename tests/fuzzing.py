"""What the fuzz modules share: hypothesis settings, the run size, and the long campaign (not run in CI).

SPECREC_FUZZ_SCALE=N multiplies each fuzzer's examples. SPECREC_FUZZ_PER_RPC=N makes a campaign: each fuzzer runs
again (fresh random inputs) until every RPC it drives has had N inputs; bench/fuzz_campaign.py runs one and writes
its report.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable

from hypothesis import HealthCheck, settings

SCALE = float(os.environ.get("SPECREC_FUZZ_SCALE", "1"))
PER_RPC = int(os.environ.get("SPECREC_FUZZ_PER_RPC", "0"))
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.data_too_large])


def examples(n: int) -> int:
    """A fuzzer's examples per run at this scale."""
    return max(1, int(n * SCALE))


def campaign(run: Callable[[], None], counts: Counter[str], rpcs: Iterable[str]) -> None:
    """Run a hypothesis fuzzer once, then again while any of `rpcs` has had fewer than PER_RPC inputs in `counts`."""
    run()
    while min(counts[rpc] for rpc in rpcs) < PER_RPC:
        run()


def enough(counts: Counter[str], rpc: str) -> bool:
    """In a campaign, an RPC that already had PER_RPC inputs is skipped while the others catch up."""
    return PER_RPC > 0 and counts[rpc] >= PER_RPC
