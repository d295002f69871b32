"""Pod-level routing for the orchestrator: EndpointSlice watching, rendezvous hashing, one channel per pod."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

# Logical service names the orchestrator routes to; the Kubernetes Service behind each comes from
# the environment (see router_from_env).
DRAFT = "draft"
TARGET = "target"

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class NoEndpointsError(LookupError):
    """No ready endpoint is known for a service."""


# ----------------------------------------------------------------------------------------------
# Rendezvous (highest-random-weight) hashing
# ----------------------------------------------------------------------------------------------


def _weight(key: str, address: str) -> int:
    # blake2b rather than hash(): the score must agree across processes (PYTHONHASHSEED) so that
    # every orchestrator replica sends a given key to the same pod.
    digest = hashlib.blake2b(f"{key}\x00{address}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_rank(key: str, addresses: Iterable[str]) -> list[str]:
    """Addresses ordered by preference for `key`: highest weight first (ties: higher address first).

    Each (key, address) pair gets an independent pseudo-random weight and the key goes to the
    address with the highest one. Removing an address therefore only moves the keys whose first
    choice it was (each to its second choice), and adding one only takes keys for which the new
    address scores highest. With addresses {a, b, c} and weights for key "r1" of a=7, b=9, c=2,
    "r1" goes to b; if b leaves, to a; c's arrival or departure never moves it.
    """
    return sorted(addresses, key=lambda a: (_weight(key, a), a), reverse=True)


def rendezvous_pick(key: str, addresses: Iterable[str]) -> str:
    """The address `key` belongs to (first of rendezvous_rank); NoEndpointsError when there is none."""
    best: str | None = None
    best_score = (0, "")
    for address in addresses:
        score = (_weight(key, address), address)
        if best is None or score > best_score:
            best, best_score = address, score
    if best is None:
        raise NoEndpointsError(f"no endpoints to place key {key!r}")
    return best


# ----------------------------------------------------------------------------------------------
# EndpointSlices -> ready addresses
# ----------------------------------------------------------------------------------------------


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def ready_addresses(endpoint_slice: Mapping[str, Any], port_name: str | None = "grpc") -> frozenset[str]:
    """The "address:port" of every ready endpoint of one EndpointSlice (a discovery.k8s.io/v1 dict).

    The port is the slice port called `port_name`, or the only port when the slice has one.
    `conditions.ready` missing counts as ready, as the API asks consumers to treat unknown state.
    Terminating endpoints are never ready, so a draining pod stops receiving new work.
    """
    ports = endpoint_slice.get("ports") or []
    port: int | None = None
    for p in ports:
        if p.get("name") == port_name and p.get("port") is not None:
            port = int(p["port"])
    if port is None and len(ports) == 1 and ports[0].get("port") is not None:
        port = int(ports[0]["port"])
    if port is None:
        return frozenset()
    found = set()
    for endpoint in endpoint_slice.get("endpoints") or []:
        conditions = endpoint.get("conditions") or {}
        if conditions.get("ready") is False:
            continue
        addresses = endpoint.get("addresses") or []
        # The addresses of one endpoint are fungible; the API asks consumers to use the first.
        if addresses:
            found.add(_join_host_port(addresses[0], port))
    return frozenset(found)


def _is_gone(exc: Exception) -> bool:
    # kubernetes.watch raises ApiException(status=410) both for a 410 response and for the ERROR event
    # a 200 watch stream carries when its resourceVersion is too old.
    return getattr(exc, "status", None) == 410


class EndpointSliceWatcher:
    """Ready endpoints of one Service, kept current by a list-then-watch loop in a daemon thread.

    The thread lists the Service's EndpointSlices (label kubernetes.io/service-name=<service>),
    then watches from the list's resourceVersion with `kubernetes.watch.Watch`, which decodes the
    event stream and tracks the resourceVersion of every event, bookmarks included; when a watch
    ends the loop resumes from that resourceVersion, and when it is too old (410 Gone) it lists
    again. The list and the relist stay here: the Python client has no informer (reflector) that
    lists, watches and relists on its own. After every change it calls `on_change(endpoints)` from
    the watcher thread with an immutable snapshot; API errors keep the last snapshot (serving from
    stale endpoints beats serving from none).
    """

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        service: str,
        on_change: Callable[[frozenset[str]], None],
        *,
        port_name: str | None = "grpc",
        watch_timeout_s: int = 240,
        backoff_s: tuple[float, float] = (0.2, 10.0),
    ) -> None:
        from kubernetes import client  # imported here: static routing must work without it

        self._api = client.DiscoveryV1Api(api_client)
        self.namespace = namespace
        self.service = service
        self._on_change = on_change
        self._port_name = port_name
        self._watch_timeout_s = watch_timeout_s
        self._backoff_s = backoff_s
        self._selector = f"{SERVICE_NAME_LABEL}={service}"
        self._slices: dict[str, frozenset[str]] = {}
        self._endpoints: frozenset[str] = frozenset()
        self._resource_version: str | None = None
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._watch_stream: Any = None  # the kubernetes.watch.Watch under way, stopped by stop()
        self._response: Any = None  # its HTTP response, shut down by stop()
        self._thread = threading.Thread(target=self._run, name=f"endpointslices-{service}", daemon=True)

    @property
    def endpoints(self) -> frozenset[str]:
        return self._endpoints

    def start(self) -> None:
        self._thread.start()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Block until the first list has been applied (or timeout); True if it has."""
        return self._synced.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        watch, response = self._watch_stream, self._response
        if watch is not None:
            watch.stop()  # the stream ends at its next event...
        if response is not None:
            # ...and this unblocks a read waiting for one (Watch.stop's own socket shutdown finds no socket on
            # urllib3 2's responses); urllib3 allows it from another thread.
            try:
                response.shutdown()
            except Exception:  # the response may be finishing concurrently
                pass
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        delay = self._backoff_s[0]
        while not self._stop.is_set():
            try:
                if self._resource_version is None:
                    self._list()
                self._watch()
                delay = self._backoff_s[0]
            except Exception as exc:
                if self._stop.is_set():
                    break
                if _is_gone(exc):
                    log.info("endpointslices %s: resourceVersion %s expired, listing again",
                             self.service, self._resource_version)
                    self._resource_version = None
                    continue
                log.warning("endpointslices %s: %s; retrying in %.1fs", self.service, exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self._backoff_s[1])

    def _list(self) -> None:
        # _preload_content=False returns the raw urllib3 response (not the typed list the client
        # annotates): plain JSON, parsed the same way as watch events.
        response: Any = self._api.list_namespaced_endpoint_slice(
            self.namespace, label_selector=self._selector, _preload_content=False, _request_timeout=30
        )
        try:
            body = json.loads(response.data)
        finally:
            response.release_conn()
        self._slices = {
            item["metadata"]["name"]: ready_addresses(item, self._port_name) for item in body.get("items") or []
        }
        self._resource_version = body["metadata"]["resourceVersion"]
        self._publish()
        self._synced.set()

    def _watch(self) -> None:
        from kubernetes import watch  # imported here: static routing must work without it

        stream = self._watch_stream = watch.Watch()
        list_slices = self._api.list_namespaced_endpoint_slice

        @functools.wraps(list_slices)  # Watch reads the return type (for resourceVersions) off the wrapped call
        def list_keeping_response(*args: Any, **kwargs: Any) -> Any:
            self._response = list_slices(*args, **kwargs)
            return self._response

        try:
            if self._stop.is_set():  # stop() ran before there was a watch to stop
                return
            # With timeout_seconds, Watch makes one request and returns when the server ends it; 410 Gone
            # arrives as an ApiException(status=410). The read timeout only catches a connection that went
            # silent without closing.
            for event in stream.stream(
                list_keeping_response, self.namespace, label_selector=self._selector,
                resource_version=self._resource_version, allow_watch_bookmarks=True,
                timeout_seconds=self._watch_timeout_s, _request_timeout=(10, self._watch_timeout_s + 30),
            ):
                if self._stop.is_set():
                    return
                self._apply(event["type"], event["raw_object"])
        finally:
            if stream.resource_version:  # the last event's or bookmark's: where the next watch resumes
                self._resource_version = stream.resource_version
            self._watch_stream = self._response = None

    def _apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        name = (obj.get("metadata") or {}).get("name")
        if kind in ("ADDED", "MODIFIED"):
            self._slices[name] = ready_addresses(obj, self._port_name)
        elif kind == "DELETED":
            self._slices.pop(name, None)
        if kind != "BOOKMARK":
            self._publish()

    def _publish(self) -> None:
        endpoints = frozenset().union(*self._slices.values())
        if endpoints != self._endpoints:
            self._endpoints = endpoints
            log.info("endpointslices %s: %d ready: %s", self.service, len(endpoints), sorted(endpoints))
            self._on_change(endpoints)


# ----------------------------------------------------------------------------------------------
# Router
# ----------------------------------------------------------------------------------------------


Listener = Callable[[str, frozenset[str]], None]


class Router:
    """Places request keys on the ready pods of each service by rendezvous hashing.

    Endpoint sets arrive from watcher threads or static configuration; `pick` reads them under a
    lock and is cheap enough to call every round, and the same key keeps landing on the same pod
    while that pod is ready. A pod reported with `mark_failed` is skipped for `failure_cooldown_s`
    (or until it leaves the ready set and comes back), which moves only the keys that were on it.
    Listeners added with `subscribe` run on the asyncio loop given at construction (without a
    loop, on the thread that delivered the change).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, *, failure_cooldown_s: float = 10.0) -> None:
        self._loop = loop
        self._cooldown_s = failure_cooldown_s
        self._lock = threading.Lock()
        self._endpoints: dict[str, frozenset[str]] = {}
        self._failed: dict[tuple[str, str], float] = {}
        self._listeners: list[Listener] = []
        self._watchers: list[EndpointSliceWatcher] = []
        self._changed: dict[str, asyncio.Event] = {}

    # -- sources ------------------------------------------------------------------------------

    def set_static(self, service: str, addresses: Iterable[str]) -> None:
        self._update(service, frozenset(addresses))

    def watch(
        self, service: str, *, api_client: Any, namespace: str, k8s_service: str, port_name: str | None = "grpc",
        **watcher_options: Any,
    ) -> EndpointSliceWatcher:
        """Follow the EndpointSlices of Kubernetes Service `k8s_service` as logical `service`."""
        watcher = EndpointSliceWatcher(
            api_client, namespace, k8s_service, lambda eps: self._update(service, eps),
            port_name=port_name, **watcher_options,
        )
        self._watchers.append(watcher)
        watcher.start()
        return watcher

    def close(self) -> None:
        for watcher in self._watchers:
            watcher.stop()

    # -- queries ------------------------------------------------------------------------------

    def endpoints(self, service: str) -> frozenset[str]:
        with self._lock:
            return self._endpoints.get(service, frozenset())

    def pick(self, service: str, key: str) -> str:
        """The pod address for `key`; pods marked failed are avoided unless no other is ready."""
        with self._lock:
            endpoints = self._endpoints.get(service, frozenset())
            now = time.monotonic()
            healthy = [a for a in endpoints if self._failed.get((service, a), 0.0) <= now]
        if not endpoints:
            raise NoEndpointsError(f"no ready endpoints for service {service!r}")
        # A pod that just failed is still a better bet than refusing the request.
        return rendezvous_pick(key, healthy or endpoints)

    def usable(self, service: str, address: str) -> bool:
        """True while `address` is ready for `service` and not in a failure cooldown."""
        with self._lock:
            ready = address in self._endpoints.get(service, frozenset())
            return ready and self._failed.get((service, address), 0.0) <= time.monotonic()

    def mark_failed(self, service: str, address: str) -> None:
        """Report that `address` failed a call; keys placed on it move to their next choice."""
        with self._lock:
            self._failed[(service, address)] = time.monotonic() + self._cooldown_s

    async def wait_for_endpoints(self, service: str, timeout: float | None = None) -> frozenset[str]:
        """Wait (on the router's loop) until `service` has a ready endpoint; TimeoutError after `timeout`."""

        async def until_ready() -> None:
            while not self.endpoints(service):
                # Every update is followed by a notification on the loop, so an update that lands
                # after the check above still wakes this wait.
                event = self._changed.setdefault(service, asyncio.Event())
                event.clear()
                await event.wait()

        await asyncio.wait_for(until_ready(), timeout)
        return self.endpoints(service)

    # -- change propagation -------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(service, endpoints)` on the router's loop after every change."""
        self._listeners.append(listener)

    def _update(self, service: str, endpoints: frozenset[str]) -> None:
        # Runs on watcher threads as well as on the loop: mutate only under the lock, then hand
        # the notification to the loop thread.
        with self._lock:
            previous = self._endpoints.get(service, frozenset())
            self._endpoints[service] = endpoints
            # A pod that left and came back (or any change of the set) gets a clean slate.
            for address in previous ^ endpoints:
                self._failed.pop((service, address), None)
        if self._loop is None:
            self._notify(service, endpoints)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._notify, service, endpoints)

    def _notify(self, service: str, endpoints: frozenset[str]) -> None:
        if (event := self._changed.get(service)) is not None:
            event.set()
        for listener in list(self._listeners):
            try:
                listener(service, endpoints)
            except Exception:
                log.exception("router listener failed for %s", service)


# ----------------------------------------------------------------------------------------------
# Channels
# ----------------------------------------------------------------------------------------------

C = TypeVar("C")


async def _close_channel(channel: Any, grace: float | None) -> None:
    result = channel.close(grace) if grace is not None else channel.close()
    if inspect.isawaitable(result):
        await result


class ChannelPool(Generic[C]):
    """One channel per ready address, made by `factory(address)`; departed pods' channels are closed.

    `sync(addresses)` is the single place channels are opened and closed, so call it (on the
    loop) whenever the ready set changes, e.g. from a Router listener via `bind`. Closing uses
    `close(grace)` when a grace is given (grpc.aio.Channel lets in-flight calls finish that long),
    so a request that is draining on a terminating pod is not cut off.
    """

    def __init__(
        self,
        factory: Callable[[str], C],
        *,
        close_grace_s: float | None = None,
        closer: Callable[[C], Awaitable[None]] | None = None,
    ) -> None:
        self._factory = factory
        self._closer = closer or (lambda ch: _close_channel(ch, close_grace_s))
        self._channels: dict[str, C] = {}
        self._syncs: set[asyncio.Task[None]] = set()

    def __contains__(self, address: object) -> bool:
        return address in self._channels

    def __len__(self) -> int:
        return len(self._channels)

    @property
    def addresses(self) -> frozenset[str]:
        return frozenset(self._channels)

    def find(self, address: str) -> C | None:
        """The open channel for `address`, or None (never opens one: for pods that may have left)."""
        return self._channels.get(address)

    def get(self, address: str) -> C:
        """The channel for `address`, opened on first use."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self._factory(address)
        return channel

    async def sync(self, addresses: Collection[str]) -> None:
        """Open channels for new addresses; close those of addresses no longer ready."""
        for address in addresses:
            self.get(address)
        departed = [a for a in self._channels if a not in addresses]
        closing = [self._closer(self._channels.pop(a)) for a in departed]
        if closing:
            await asyncio.gather(*closing, return_exceptions=True)

    def bind(self, router: Router, service: str) -> None:
        """Keep this pool in step with `service`'s endpoints on `router`, which must have a loop."""

        def on_change(changed: str, endpoints: frozenset[str]) -> None:
            if changed == service:
                task = asyncio.get_running_loop().create_task(self.sync(endpoints))
                self._syncs.add(task)  # a reference, so the task is not garbage-collected mid-flight
                task.add_done_callback(self._syncs.discard)

        router.subscribe(on_change)

    async def close(self) -> None:
        if self._syncs:
            await asyncio.gather(*self._syncs, return_exceptions=True)
        await self.sync(())


# ----------------------------------------------------------------------------------------------
# Configuration from the environment (what the Helm chart sets)
# ----------------------------------------------------------------------------------------------


def _split_addresses(value: str) -> frozenset[str]:
    return frozenset(a.strip() for a in value.split(",") if a.strip())


def router_from_env(loop: asyncio.AbstractEventLoop | None = None, env: Mapping[str, str] | None = None) -> Router:
    """A Router for DRAFT and TARGET configured the way the Helm chart sets the environment.

    SPECREC_ROUTING=endpointslices (default inside a cluster): watch the EndpointSlices of
    Services SPECREC_DRAFT_SERVICE and SPECREC_TARGET_SERVICE in SPECREC_NAMESPACE (else the pod's
    own namespace). Otherwise, or outside a cluster: static addresses from SPECREC_DRAFT_ADDR and
    SPECREC_TARGET_ADDR (comma-separated host:port lists). A service without configuration is
    left out, and picking it raises NoEndpointsError (the orchestrator then decodes without a drafter).
    """
    env = os.environ if env is None else env
    router = Router(loop)
    mode = env.get("SPECREC_ROUTING") or ("endpointslices" if "KUBERNETES_SERVICE_HOST" in env else "static")
    if mode == "endpointslices":
        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        api_client = client.ApiClient(configuration)
        namespace = env.get("SPECREC_NAMESPACE") or _SA_NAMESPACE_FILE.read_text().strip()
        for service, variable in ((DRAFT, "SPECREC_DRAFT_SERVICE"), (TARGET, "SPECREC_TARGET_SERVICE")):
            if k8s_service := env.get(variable):
                router.watch(service, api_client=api_client, namespace=namespace, k8s_service=k8s_service)
    elif mode == "static":
        for service, variable in ((DRAFT, "SPECREC_DRAFT_ADDR"), (TARGET, "SPECREC_TARGET_ADDR")):
            if addresses := _split_addresses(env.get(variable, "")):
                router.set_static(service, addresses)
    else:
        raise ValueError(f"SPECREC_ROUTING must be 'endpointslices' or 'static', not {mode!r}")
    return router
