"""The request path's view of the cluster: a TargetClient and a DraftClient per ready pod, placed by the Router.

A request is keyed (its Triton sequence id) and stays on the Triton pod its key ranks first for as long
as that pod is ready and not failing, because the pod holds the sequence's KV cache; only then does it
move, to the next pod of its rendezvous ranking, where the sequence is rebuilt from its context.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, TypeVar

import grpc
from prometheus_client import CollectorRegistry, Counter

from orchestrator.draft_client import DraftClient
from orchestrator.routing import DRAFT, TARGET, ChannelPool, Router, rendezvous_rank, router_from_env
from orchestrator.versions import PodVersions, VersionMetrics
from specrec.target_client import TargetClient, TargetError, TargetUnavailable

log = logging.getLogger(__name__)


class _Closable(Protocol):
    async def close(self) -> None: ...


Client = TypeVar("Client", bound=_Closable)
T = TypeVar("T")


class Backends:
    """Router + one client per ready pod of each service, kept in step with the Router's endpoints."""

    def __init__(
        self,
        router: Router,
        make_target: Callable[[str], TargetClient],
        make_draft: Callable[[str], DraftClient],
        *,
        close_grace_s: float = 5.0,
        registry: CollectorRegistry | None = None,
        model_version: str = "",
        probe_wait_s: float = 10.0,
    ) -> None:
        """`model_version`: the catalog's; when set, only pods that report it are used (orchestrator.versions)."""
        self.router = router
        self._grace_s = close_grace_s
        self._closing = asyncio.Event()
        self.targets: ChannelPool[TargetClient] = ChannelPool(make_target, closer=self._close_later)
        self.drafts: ChannelPool[DraftClient] = ChannelPool(make_draft, closer=self._close_later)
        self.targets.bind(router, TARGET)
        self.drafts.bind(router, DRAFT)
        self.moves = Counter("specrec_target_moves", "Requests whose sequence moved to another Triton pod, by reason "
                             "(pod_left: no longer ready; unavailable: a call failed UNAVAILABLE; timeout: a verify "
                             "timed out on a pod while others were ready).", ["reason"], registry=registry)
        self._failures: dict[str, str] = {}  # why a pod last failed a call: the reason of the moves it causes
        self._probe_wait_s = probe_wait_s
        self.versions: dict[str, PodVersions] = {}
        if model_version:
            metrics = VersionMetrics(registry)
            self.versions = {
                TARGET: PodVersions(TARGET, model_version, lambda a: self.targets.get(a).model_version(), metrics),
                DRAFT: PodVersions(DRAFT, model_version, lambda a: self.drafts.get(a).model_version(), metrics)}
            router.subscribe(self._on_endpoints)

    def _on_endpoints(self, service: str, endpoints: frozenset[str]) -> None:
        if service in self.versions:  # called on the router's loop, like ChannelPool.bind's listener
            self.versions[service].sync(endpoints)

    def serves_our_version(self, service: str, address: str) -> bool:
        """Whether `address` is known to serve the catalog's model version (always, without pairing)."""
        versions = self.versions.get(service)
        return versions is None or versions.matches(address)

    async def start(self) -> None:
        """Open clients for the endpoints known already (static addresses arrive before any listener) and,
        with pairing, learn their versions (waiting up to `probe_wait_s`, so the first requests find them)."""
        await self.targets.sync(self.router.endpoints(TARGET))
        await self.drafts.sync(self.router.endpoints(DRAFT))
        for service, versions in self.versions.items():
            versions.sync(self.router.endpoints(service))
        for versions in self.versions.values():
            await versions.settled(self._probe_wait_s)

    async def close(self) -> None:
        self._closing.set()
        for versions in self.versions.values():
            versions.close()
        self.router.close()
        await self.targets.close()
        await self.drafts.close()

    async def _close_later(self, client: Client) -> None:
        # A pod that left the ready set (terminating) still answers the calls already in flight:
        # give them the grace before closing, so they finish instead of being cancelled.
        try:
            await asyncio.wait_for(self._closing.wait(), self._grace_s)
        except TimeoutError:
            pass
        await client.close()

    # -- the target ---------------------------------------------------------------------------

    def _pick(self, service: str, key: str) -> str | None:
        """The best-ranked pod of `service` for `key` among those serving our version: usable ones first
        (a pod that just failed is still a better bet than refusing the request)."""
        ranked = [a for a in rendezvous_rank(key, self.router.endpoints(service))
                  if self.serves_our_version(service, a)]
        return next((a for a in ranked if self.router.usable(service, a)), ranked[0] if ranked else None)

    async def target_for(self, key: str, current: str | None = None) -> tuple[str, TargetClient]:
        """target(), after waiting for version probes under way when no Triton pod is known to serve our version."""
        versions = self.versions.get(TARGET)
        if versions is not None and not any(versions.matches(a) for a in self.router.endpoints(TARGET)):
            await versions.settled(self._probe_wait_s)
        return self.target(key, current)

    def target(self, key: str, current: str | None = None) -> tuple[str, TargetClient]:
        """The Triton pod for `key`: `current` while it is usable, else the best-ranked usable pod."""
        if current is not None and self.router.usable(TARGET, current) and self.serves_our_version(TARGET, current):
            return current, self.targets.get(current)
        address = self._pick(TARGET, key)
        if address is None:
            versions = self.versions.get(TARGET)
            known = f" serving model version {versions.expected} (pods: {versions.describe()})" if versions else ""
            raise TargetUnavailable(f"no ready Triton pod{known} to verify on (none configured, or every pod "
                                    "left); check the Triton pods and the orchestrator's --target-addr / routing "
                                    "settings", grpc.StatusCode.UNAVAILABLE)
        return address, self.targets.get(address)

    def answered_by(self, address: str, version: str) -> bool:
        """Whether an answer from `address` that says it came from model `version` may be used; if not, the pod
        serves another training (replaced in place): it is not used again and the request moves."""
        versions = self.versions.get(TARGET)
        if versions is None or not version:
            return True
        versions.learn(address, version)
        if version == versions.expected:
            return True
        self._failures[address] = "version"
        return False

    @staticmethod
    async def call(address: str, call: Awaitable[T]) -> T:
        """Await a call on `address`'s client, reporting a client closed under it as a TargetError.

        A departed pod's client is closed after the grace; a call still on it then fails with a
        UsageError, or a CancelledError that is not this task's (grpc cancels in-flight calls).
        """
        try:
            return await call
        except grpc.aio.UsageError:
            raise TargetError(f"target {address}: its client is closed (the pod left)", grpc.StatusCode.CANCELLED) \
                from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():  # the request itself is being cancelled
                raise
            raise TargetError(f"target {address}: the call was cut off (the pod left)", grpc.StatusCode.CANCELLED) \
                from None

    def lost(self, address: str, error: TargetError) -> bool:
        """Whether `error` from `address` means the pod is gone (the request should move), marking it failed."""
        if error.code == grpc.StatusCode.UNAVAILABLE:  # down or unreachable (a full queue is RESOURCE_EXHAUSTED)
            self.router.mark_failed(TARGET, address)
            self._failures[address] = "unavailable"
            return True
        if error.code == grpc.StatusCode.DEADLINE_EXCEEDED and len(self.router.endpoints(TARGET)) > 1:
            # A hung pod (stopped process, wedged device) keeps its connections open and stays "ready" until a
            # probe fails: only the verify timeout notices. With one pod there is nowhere better to go.
            self.router.mark_failed(TARGET, address)
            self._failures[address] = "timeout"
            return True
        # The pod left while the call was in flight (its client may have been closed under it).
        return address not in self.router.endpoints(TARGET)

    def moved(self, old: str, new: str) -> None:
        """Count a request's move from pod `old` to pod `new`."""
        reason = "pod_left" if old not in self.router.endpoints(TARGET) else self._failures.pop(old, "unavailable")
        # reasons: pod_left, unavailable, timeout, version (the pod answered for another model version)
        self.moves.labels(reason).inc()
        log.info("sequence moves from Triton pod %s to %s (%s)", old, new, reason)

    def attempts(self) -> int:
        """How many pods one verify may try: each ready pod once, at least one."""
        return max(1, len(self.router.endpoints(TARGET)))

    # -- the drafter --------------------------------------------------------------------------

    def draft(self, key: str) -> DraftClient | None:
        """The draft pod for `key`: the best-ranked pod of our model version not in its failure backoff;
        None: no drafter (plain decoding)."""
        for address in rendezvous_rank(key, self.router.endpoints(DRAFT)):
            if not self.serves_our_version(DRAFT, address):
                continue  # another training's drafter: its trees would be in another vocabulary
            client = self.drafts.get(address)
            if client.available:
                return client
        return None


def router_from_config(
    loop: asyncio.AbstractEventLoop, *, target_addr: str, draft_addr: str, routing: str = "",
    env: Mapping[str, str] | None = None,
) -> Router:
    """router_from_env with the orchestrator's flags overriding their environment variables.

    Static mode reads the comma-separated `target_addr` / `draft_addr`; EndpointSlice mode reads
    SPECREC_TARGET_SERVICE, SPECREC_DRAFT_SERVICE and SPECREC_NAMESPACE from the environment.
    """
    import os

    merged = dict(os.environ if env is None else env)
    merged.update({"SPECREC_TARGET_ADDR": target_addr, "SPECREC_DRAFT_ADDR": draft_addr})
    if routing:
        merged["SPECREC_ROUTING"] = routing
    return router_from_env(loop, merged)
