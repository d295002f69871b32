"""Routing tests: rendezvous hashing, Router, ChannelPool, and the EndpointSlice watcher.

No Kubernetes API server can run on this machine (no container runtime, no etcd), so the watcher
is tested against a local http.server that speaks just enough of the list/watch EndpointSlice API
(discovery.k8s.io/v1): a list answers an EndpointSliceList with metadata.resourceVersion, a watch
streams newline-delimited ADDED/MODIFIED/DELETED events after a resourceVersion, and a watch from
an expired resourceVersion answers with a 410 Status event, as the real server does.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes import client

from orchestrator.routing import (
    DRAFT,
    TARGET,
    ChannelPool,
    EndpointSliceWatcher,
    NoEndpointsError,
    Router,
    ready_addresses,
    rendezvous_pick,
    rendezvous_rank,
    router_from_env,
)

NS = "specrec"

# ----------------------------------------------------------------------------------------------
# A stand-in for the API server
# ----------------------------------------------------------------------------------------------


def endpoint_slice(name: str, service: str, pods: dict[str, bool | None], port: int = 8001) -> dict[str, Any]:
    """An EndpointSlice as the API serves it; `pods` maps pod IP to its ready condition."""
    endpoints = []
    for ip, ready in pods.items():
        conditions = {} if ready is None else {"ready": ready, "serving": ready, "terminating": not ready}
        endpoints.append({"addresses": [ip], "conditions": conditions, "targetRef": {"kind": "Pod", "name": ip}})
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NS, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}, {"name": "http", "port": 8000}],
    }


class FakeEndpointSliceAPI:
    """EndpointSlices with a resourceVersion counter, an event history and the list/watch protocol."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.rv = 100
        self.oldest_rv = 0  # watches from an older resourceVersion get 410 Gone
        self.slices: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[int, str, dict[str, Any]]] = []
        self.requests: list[dict[str, str]] = []
        self.generation = 0  # bumped to end every open watch
        self.gone_as_status = False  # answer expired watches with HTTP 410 instead of an ERROR event
        self.closed = False

    # -- state changes, each one event --

    def _record(self, kind: str, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj = json.loads(json.dumps(obj))
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.events.append((self.rv, kind, obj))
        self.cond.notify_all()

    def put(self, obj: dict[str, Any]) -> None:
        with self.cond:
            name = obj["metadata"]["name"]
            kind = "MODIFIED" if name in self.slices else "ADDED"
            self.slices[name] = obj
            self._record(kind, obj)

    def delete(self, name: str) -> None:
        with self.cond:
            self._record("DELETED", self.slices.pop(name))

    def bookmark(self) -> str:
        """A BOOKMARK event (sent to watches that allow them): only a newer resourceVersion, no change."""
        with self.cond:
            self.rv += 1
            mark = {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                    "metadata": {"resourceVersion": str(self.rv)}}
            self.events.append((self.rv, "BOOKMARK", mark))
            self.cond.notify_all()
            return str(self.rv)

    def drop_watches(self) -> None:
        """End every open watch, as the server does on its own timeout or a restart."""
        with self.cond:
            self.generation += 1
            self.cond.notify_all()

    def expire_history(self) -> None:
        """Compact: every resourceVersion up to now is too old to watch from."""
        with self.cond:
            self.oldest_rv = self.rv + 1
            self.generation += 1
            self.cond.notify_all()

    def shutdown(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def count(self, *, watch: bool) -> int:
        return sum(1 for q in self.requests if (q.get("watch") == "true") == watch)

    # -- protocol --

    @staticmethod
    def _matches(obj: dict[str, Any], selector: str) -> bool:
        key, _, value = selector.partition("=")
        return obj["metadata"]["labels"].get(key) == value

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        url = urlparse(handler.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        with self.cond:
            self.requests.append(query)
        if url.path != f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices":
            handler.send_error(404)
            return
        selector = query.get("labelSelector", "")
        if query.get("watch") == "true":
            self._watch(handler, selector, int(query["resourceVersion"]), float(query.get("timeoutSeconds", 60)),
                        bookmarks=query.get("allowWatchBookmarks") == "true")
            return
        with self.cond:
            body = {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSliceList",
                "metadata": {"resourceVersion": str(self.rv)},
                "items": [s for s in self.slices.values() if self._matches(s, selector)],
            }
        data = json.dumps(body).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _watch(self, handler: BaseHTTPRequestHandler, selector: str, since: int, timeout_s: float,
               bookmarks: bool) -> None:
        if since < self.oldest_rv and self.gone_as_status:
            handler.send_error(410, "Gone")
            return
        # Like the real server: HTTP/1.1, one chunk per event, the stream ends with the last chunk.
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.send_header("Connection", "close")
        handler.end_headers()

        def send(event: dict[str, Any]) -> None:
            line = json.dumps(event).encode() + b"\n"
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            handler.wfile.flush()

        try:
            if since < self.oldest_rv:
                gone = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired",
                        "message": f"too old resource version: {since}", "code": 410}
                send({"type": "ERROR", "object": gone})
            else:
                self._stream(send, selector, since, timeout_s, bookmarks)
            handler.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client hung up
            pass

    def _stream(self, send: Callable[[dict[str, Any]], None], selector: str, since: int, timeout_s: float,
                bookmarks: bool) -> None:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            generation = self.generation
        sent = since
        while True:
            with self.cond:
                pending = [(rv, k, o) for rv, k, o in self.events if rv > sent]
                if not pending:
                    self.cond.wait(0.05)
                    if self.closed or self.generation != generation or time.monotonic() > deadline:
                        return
                    continue
            for rv, kind, obj in pending:
                sent = rv
                if kind == "BOOKMARK" and bookmarks or kind != "BOOKMARK" and self._matches(obj, selector):
                    send({"type": kind, "object": obj})


@pytest.fixture
def api() -> Iterator[tuple[FakeEndpointSliceAPI, client.ApiClient]]:
    fake = FakeEndpointSliceAPI()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            fake.handle(self)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
    api_client = client.ApiClient(configuration)
    yield fake, api_client
    fake.shutdown()
    server.shutdown()
    server.server_close()


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


async def async_wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


class Recorder:
    """on_change target that keeps every snapshot the watcher published."""

    def __init__(self) -> None:
        self.snapshots: list[frozenset[str]] = []

    def __call__(self, endpoints: frozenset[str]) -> None:
        self.snapshots.append(endpoints)

    @property
    def last(self) -> frozenset[str]:
        return self.snapshots[-1] if self.snapshots else frozenset()


# ----------------------------------------------------------------------------------------------
# EndpointSlice parsing and watching
# ----------------------------------------------------------------------------------------------


def test_ready_addresses_reads_ready_endpoints_on_the_named_port() -> None:
    s = endpoint_slice("t-1", "triton", {"10.0.0.1": True, "10.0.0.2": False, "10.0.0.3": None})
    # Not ready is out; an unknown ready condition counts as ready.
    assert ready_addresses(s) == {"10.0.0.1:8001", "10.0.0.3:8001"}
    assert ready_addresses(s, "http") == {"10.0.0.1:8000", "10.0.0.3:8000"}
    # No port of that name and more than one port: nothing routable.
    assert ready_addresses(s, "metrics") == frozenset()
    # A single unnamed port is used whatever the name asked for.
    s["ports"] = [{"port": 9000}]
    assert ready_addresses(s) == {"10.0.0.1:9000", "10.0.0.3:9000"}
    s6 = endpoint_slice("t-6", "triton", {"fd00::7": True})
    assert ready_addresses(s6) == {"[fd00::7]:8001"}


def test_watcher_follows_endpoints_appearing_turning_unready_and_disappearing(api) -> None:
    fake, api_client = api
    fake.put(endpoint_slice("triton-a", "triton", {"10.0.0.1": True, "10.0.0.2": True}))
    fake.put(endpoint_slice("draft-a", "draft", {"10.0.1.1": True}, port=50052))  # another Service
    seen = Recorder()
    watcher = EndpointSliceWatcher(api_client, NS, "triton", seen)
    watcher.start()
    try:
        assert watcher.wait_synced(5)
        assert watcher.endpoints == {"10.0.0.1:8001", "10.0.0.2:8001"}
        # The list asked for this Service's slices only; the watch started at the list's version.
        wait_until(lambda: fake.count(watch=True) == 1)
        first_list, first_watch = fake.requests[0], next(q for q in fake.requests if q.get("watch") == "true")
        assert first_list["labelSelector"] == "kubernetes.io/service-name=triton"
        assert first_watch["resourceVersion"] == "102"

        # A second slice of the same Service appears.
        fake.put(endpoint_slice("triton-b", "triton", {"10.0.0.3": True}))
        wait_until(lambda: watcher.endpoints == {"10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"})
        # A pod turns not ready (e.g. terminating): it leaves the set.
        fake.put(endpoint_slice("triton-a", "triton", {"10.0.0.1": True, "10.0.0.2": False}))
        wait_until(lambda: watcher.endpoints == {"10.0.0.1:8001", "10.0.0.3:8001"})
        # A slice is deleted: its pods disappear.
        fake.delete("triton-b")
        wait_until(lambda: watcher.endpoints == {"10.0.0.1:8001"})
        # Changes to the other Service never showed up, and every published snapshot was distinct.
        fake.put(endpoint_slice("draft-a", "draft", {"10.0.1.1": True, "10.0.1.2": True}, port=50052))
        time.sleep(0.1)
        assert watcher.endpoints == {"10.0.0.1:8001"}
        assert all(a != b for a, b in zip(seen.snapshots, seen.snapshots[1:], strict=False))
        assert fake.count(watch=False) == 1
    finally:
        watcher.stop()
    assert not watcher._thread.is_alive()


def test_watcher_resumes_from_resource_version_and_relists_after_410(api) -> None:
    fake, api_client = api
    fake.put(endpoint_slice("triton-a", "triton", {"10.0.0.1": True}))
    watcher = EndpointSliceWatcher(api_client, NS, "triton", Recorder(), backoff_s=(0.01, 0.05))
    watcher.start()
    try:
        assert watcher.wait_synced(5)
        fake.put(endpoint_slice("triton-a", "triton", {"10.0.0.1": True, "10.0.0.2": True}))
        wait_until(lambda: len(watcher.endpoints) == 2)
        last_seen = str(fake.rv)

        # The server ends the watch: the client watches again from the last version it saw,
        # without listing again.
        fake.drop_watches()
        wait_until(lambda: fake.count(watch=True) >= 2)
        assert fake.requests[-1]["resourceVersion"] == last_seen
        assert fake.count(watch=False) == 1

        # History is compacted and a pod leaves meanwhile: the watch gets 410 Gone, the client
        # lists again and catches up.
        fake.expire_history()
        fake.put(endpoint_slice("triton-a", "triton", {"10.0.0.2": True}))
        wait_until(lambda: watcher.endpoints == {"10.0.0.2:8001"})
        assert fake.count(watch=False) == 2
        # ... then watches from the new list's version and sees further changes.
        fake.put(endpoint_slice("triton-a", "triton", {"10.0.0.2": True, "10.0.0.4": True}))
        wait_until(lambda: watcher.endpoints == {"10.0.0.2:8001", "10.0.0.4:8001"})

        # Same again with the 410 as the HTTP status of the watch response.
        fake.gone_as_status = True
        fake.expire_history()
        fake.put(endpoint_slice("triton-a", "triton", {"10.0.0.4": True}))
        wait_until(lambda: watcher.endpoints == {"10.0.0.4:8001"})
        assert fake.count(watch=False) == 3
    finally:
        watcher.stop()


def test_watcher_resumes_from_a_bookmark_without_publishing_it(api) -> None:
    fake, api_client = api
    fake.put(endpoint_slice("triton-a", "triton", {"10.0.0.1": True}))
    seen = Recorder()
    watcher = EndpointSliceWatcher(api_client, NS, "triton", seen, backoff_s=(0.01, 0.05))
    watcher.start()
    try:
        assert watcher.wait_synced(5)
        wait_until(lambda: fake.count(watch=True) == 1)
        assert fake.requests[-1]["allowWatchBookmarks"] == "true"
        # Another Service changes (no event for this watch), then the server bookmarks its progress.
        fake.put(endpoint_slice("draft-a", "draft", {"10.0.1.1": True}, port=50052))
        mark = fake.bookmark()
        time.sleep(0.2)  # the bookmark has reached the watcher
        fake.drop_watches()
        # The next watch starts from the bookmark, not from the older version of the last slice seen.
        wait_until(lambda: fake.count(watch=True) == 2)
        assert fake.requests[-1]["resourceVersion"] == mark
        assert fake.count(watch=False) == 1 and len(seen.snapshots) == 1  # a bookmark is not a change
    finally:
        watcher.stop()
    assert not watcher._thread.is_alive()


def test_watcher_keeps_last_endpoints_while_the_api_is_unreachable() -> None:
    configuration = client.Configuration()
    configuration.host = "http://127.0.0.1:9"  # discard port: connection refused
    seen = Recorder()
    watcher = EndpointSliceWatcher(client.ApiClient(configuration), NS, "triton", seen, backoff_s=(0.01, 0.02))
    watcher.start()
    time.sleep(0.2)
    watcher.stop()
    assert not watcher._thread.is_alive()
    assert seen.snapshots == [] and watcher.endpoints == frozenset()


# ----------------------------------------------------------------------------------------------
# Rendezvous hashing
# ----------------------------------------------------------------------------------------------

ADDRESS = st.builds(lambda a, b: f"10.0.{a}.{b}:8001", st.integers(0, 255), st.integers(1, 254))
KEYS = [f"req-{i}" for i in range(1000)]


@settings(max_examples=40, deadline=None)
@given(nodes=st.sets(ADDRESS, min_size=2, max_size=12), data=st.data())
def test_rendezvous_is_stable_and_removal_moves_only_the_removed_nodes_keys(nodes: set[str], data) -> None:
    ordered = sorted(nodes)
    shuffled = data.draw(st.permutations(ordered))
    before = {k: rendezvous_pick(k, ordered) for k in KEYS}
    # Stable: the same key lands on the same node whatever the order of the candidates.
    assert before == {k: rendezvous_pick(k, shuffled) for k in KEYS}
    assert all(rendezvous_rank(k, shuffled)[0] == before[k] for k in KEYS[:100])

    gone = data.draw(st.sampled_from(ordered))
    after = {k: rendezvous_pick(k, nodes - {gone}) for k in KEYS}
    for k in KEYS:
        if before[k] == gone:
            # Its keys go to their second choice ...
            assert after[k] == rendezvous_rank(k, nodes)[1]
        else:
            # ... and nobody else moves.
            assert after[k] == before[k]


@settings(max_examples=40, deadline=None)
@given(nodes=st.sets(ADDRESS, min_size=1, max_size=12), new=ADDRESS)
def test_rendezvous_addition_only_takes_keys_for_the_new_node(nodes: set[str], new: str) -> None:
    before = {k: rendezvous_pick(k, nodes) for k in KEYS}
    after = {k: rendezvous_pick(k, nodes | {new}) for k in KEYS}
    assert all(after[k] in (before[k], new) for k in KEYS)


def test_rendezvous_spreads_keys_evenly() -> None:
    nodes = [f"10.0.0.{i}:8001" for i in range(1, 9)]
    counts = dict.fromkeys(nodes, 0)
    for i in range(20_000):
        counts[rendezvous_pick(f"user-{i}", nodes)] += 1
    mean = 20_000 / len(nodes)
    assert all(0.85 * mean < c < 1.15 * mean for c in counts.values()), counts


def test_rendezvous_pick_without_nodes_raises() -> None:
    with pytest.raises(NoEndpointsError):
        rendezvous_pick("k", [])


# ----------------------------------------------------------------------------------------------
# Router
# ----------------------------------------------------------------------------------------------


def test_router_mark_failed_moves_only_that_pods_keys_until_cooldown_or_return() -> None:
    pods = {f"10.0.0.{i}:8001" for i in range(1, 6)}
    router = Router(failure_cooldown_s=0.2)
    router.set_static(TARGET, pods)
    keys = [f"seq-{i}" for i in range(500)]
    placed = {k: router.pick(TARGET, k) for k in keys}
    assert placed == {k: router.pick(TARGET, k) for k in keys}  # every round, same pod

    victim = placed[keys[0]]
    router.mark_failed(TARGET, victim)
    moved = {k: router.pick(TARGET, k) for k in keys}
    for k in keys:
        assert moved[k] == (rendezvous_rank(k, pods)[1] if placed[k] == victim else placed[k])

    # After the cooldown the pod takes its keys back.
    time.sleep(0.25)
    assert {k: router.pick(TARGET, k) for k in keys} == placed

    # Leaving the ready set and coming back also clears a failure mark.
    router.mark_failed(TARGET, victim)
    router.set_static(TARGET, pods - {victim})
    router.set_static(TARGET, pods)
    assert router.pick(TARGET, keys[0]) == victim

    # With every pod marked failed, a failed pod is still better than no answer.
    for pod in pods:
        router.mark_failed(TARGET, pod)
    assert router.pick(TARGET, keys[0]) in pods

    with pytest.raises(NoEndpointsError):
        router.pick(DRAFT, "anything")


async def test_router_publishes_watcher_snapshots_to_asyncio_and_pool_tracks_them(api) -> None:
    fake, api_client = api
    ips = [f"10.0.0.{i}" for i in range(1, 5)]
    fake.put(endpoint_slice("triton-a", "triton", {ip: True for ip in ips}))

    loop = asyncio.get_running_loop()
    router = Router(loop)
    closed: list[str] = []
    opened: dict[str, grpc.aio.Channel] = {}

    def factory(address: str) -> grpc.aio.Channel:
        opened[address] = grpc.aio.insecure_channel(address)  # lazy: nothing dials until a call
        return opened[address]

    async def closer(channel: grpc.aio.Channel) -> None:
        closed.append(next(a for a, c in opened.items() if c is channel))
        await channel.close(grace=0.1)

    pool: ChannelPool[grpc.aio.Channel] = ChannelPool(factory, closer=closer)
    pool.bind(router, TARGET)
    listener_threads: list[int] = []
    router.subscribe(lambda service, eps: listener_threads.append(threading.get_ident()))
    router.watch(TARGET, api_client=api_client, namespace=NS, k8s_service="triton")
    try:
        await router.wait_for_endpoints(TARGET, timeout=5)
        await async_wait_until(lambda: pool.addresses == {f"{ip}:8001" for ip in ips})
        # Listeners ran on the loop's thread, not the watcher's.
        assert set(listener_threads) == {threading.get_ident()}

        keys = [f"seq-{i}" for i in range(300)]
        placed = {k: router.pick(TARGET, k) for k in keys}
        # One pod goes away: only its requests move, and its channel is closed.
        fake.put(endpoint_slice("triton-a", "triton", {ip: ip != ips[0] for ip in ips}))
        await async_wait_until(lambda: f"{ips[0]}:8001" not in pool)
        await async_wait_until(lambda: closed == [f"{ips[0]}:8001"])  # the closer runs as a task of its own
        for k in keys:
            if placed[k] != f"{ips[0]}:8001":
                assert router.pick(TARGET, k) == placed[k]
            else:
                assert router.pick(TARGET, k) != placed[k]
        # The slice is deleted: no endpoints, no channels.
        fake.delete("triton-a")
        await async_wait_until(lambda: len(pool) == 0)
        with pytest.raises(NoEndpointsError):
            router.pick(TARGET, keys[0])
    finally:
        router.close()
        await pool.close()


async def test_wait_for_endpoints_times_out() -> None:
    router = Router(asyncio.get_running_loop())
    with pytest.raises(TimeoutError):
        await router.wait_for_endpoints(DRAFT, timeout=0.05)
    router.set_static(DRAFT, ["127.0.0.1:50052"])
    assert await router.wait_for_endpoints(DRAFT, timeout=1) == {"127.0.0.1:50052"}


async def test_channel_pool_opens_lazily_and_closes_departed() -> None:
    made: list[str] = []
    closed: list[str] = []

    class FakeChannel:
        def __init__(self, address: str) -> None:
            self.address = address
            made.append(address)

        async def close(self, grace: float | None = None) -> None:
            closed.append(self.address)

    pool: ChannelPool[FakeChannel] = ChannelPool(FakeChannel, close_grace_s=1.0)
    await pool.sync({"a:1", "b:1"})
    assert sorted(made) == ["a:1", "b:1"]
    assert pool.get("a:1") is pool.get("a:1")  # one channel per address
    await pool.sync({"b:1", "c:1"})
    assert closed == ["a:1"] and pool.addresses == {"b:1", "c:1"}
    await pool.close()
    assert sorted(closed) == ["a:1", "b:1", "c:1"] and len(pool) == 0


def test_router_from_env_static_addresses() -> None:
    env = {"SPECREC_DRAFT_ADDR": "d1:50052, d2:50052", "SPECREC_TARGET_ADDR": "localhost:8001"}
    router = router_from_env(env=env)
    assert router.endpoints(DRAFT) == {"d1:50052", "d2:50052"}
    assert router.pick(TARGET, "k") == "localhost:8001"
    # No drafter configured: picking it says so instead of guessing.
    router = router_from_env(env={"SPECREC_TARGET_ADDR": "t:8001"})
    with pytest.raises(NoEndpointsError):
        router.pick(DRAFT, "k")
    with pytest.raises(ValueError, match="SPECREC_ROUTING"):
        router_from_env(env={"SPECREC_ROUTING": "dns"})


def test_rank_is_a_permutation() -> None:
    nodes = [f"n{i}" for i in range(7)]
    rng = random.Random(0)
    for _ in range(50):
        key = str(rng.random())
        assert sorted(rendezvous_rank(key, nodes)) == nodes
