"""Which pods serve the orchestrator's model version: each pod is asked once (a probe) before any request uses it.

Drafter, target and catalog of different trainings share no vocabulary, so during a model rollout an orchestrator
sends requests only to the draft and Triton pods whose artifact identity (specrec.model_identity) equals its
catalog's. A pod not probed yet, or whose probe failed, is not used; the probe is retried while the pod is ready.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection

from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)
RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)  # a pod that just became ready may still be loading its model


class VersionMetrics:
    """The pairing's metrics, shared by the PodVersions of the draft and Triton pods."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.mismatched = Gauge("specrec_mismatched_pods", "Ready pods serving another model version than this "
                                "orchestrator's catalog (never used), by service.", ["service"], registry=registry)
        self.mismatches = Counter("specrec_version_mismatches", "Pods found serving another model version, by "
                                  "service (at their probe, or in a verify answer).", ["service"], registry=registry)


class PodVersions:
    """The model version of each ready pod of one service, learnt by `probe(address)`."""

    def __init__(self, service: str, expected: str, probe: Callable[[str], Awaitable[str]],
                 metrics: VersionMetrics) -> None:
        self.service, self.expected, self._probe, self._metrics = service, expected, probe, metrics
        self._known: dict[str, str] = {}
        self._probing: dict[str, asyncio.Task[None]] = {}
        self.listeners: list[Callable[[], None]] = []  # called when a pod's version is learnt or forgotten

    def matches(self, address: str) -> bool:
        return self._known.get(address) == self.expected

    def version(self, address: str) -> str | None:
        return self._known.get(address)

    def learn(self, address: str, version: str) -> None:
        """Record `address`'s version (from a probe, or from an answer that says which version served it)."""
        if self._known.get(address) == version:
            return
        self._known[address] = version
        if version != self.expected:
            self._metrics.mismatches.labels(self.service).inc()
            log.warning("%s pod %s serves model version %s, this orchestrator's catalog is %s: not used",
                        self.service, address, version, self.expected)
        self._publish()

    def sync(self, addresses: Collection[str]) -> None:
        """Probe new ready pods in the background; forget pods that left (a pod back at the address is asked again)."""
        for address in [a for a in self._known if a not in addresses]:
            del self._known[address]
        for address in [a for a in self._probing if a not in addresses]:
            self._probing.pop(address).cancel()
        for address in addresses:
            if address not in self._known and address not in self._probing:
                task = asyncio.get_running_loop().create_task(self._ask(address))
                self._probing[address] = task
                task.add_done_callback(lambda _, a=address: self._probing.pop(a, None))
        self._publish()

    async def _ask(self, address: str) -> None:
        attempt = 0
        while True:
            try:
                self.learn(address, await self._probe(address))
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # not up yet, or gone: the pod stays unused until it answers
                delay = RETRY_S[min(attempt, len(RETRY_S) - 1)]
                attempt += 1
                log.debug("%s pod %s: version probe failed (%s); again in %.1f s", self.service, address, e, delay)
                await asyncio.sleep(delay)

    async def settled(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the probes under way (a request that finds no matching pod yet)."""
        if self._probing:
            await asyncio.wait(list(self._probing.values()), timeout=timeout_s)

    def describe(self) -> str:
        return ", ".join(f"{a}={v}" for a, v in sorted(self._known.items())) or "none probed"

    def _publish(self) -> None:
        self._metrics.mismatched.labels(self.service).set(sum(v != self.expected for v in self._known.values()))
        for listener in self.listeners:
            listener()

    def close(self) -> None:
        for task in self._probing.values():
            task.cancel()
