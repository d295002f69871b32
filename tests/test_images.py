"""The chart's pods, run as rendered: the images `make images` builds, started as docker containers with each
container's command, args, env, user and volumes taken from `helm template` (harness/pods.py), on a private
docker network where the Services' DNS names point at the pods.

Real parts: a private dockerd (Debian's docker.io), images built from the Dockerfiles with the tiny artifacts baked
in, the real helm binary, real Triton inside the target image. Emulated, because no cluster runs here: the kubelet's
probes and restarts (run from the test) and kube-proxy (a Service's name resolves to its one pod); routing is
static (the EndpointSlice watcher needs an API server) and the accelerators are off (no GPU).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from harness.containers import BUILD_LABEL, TAG, ContainerError, make_images, prune_replaced_images, running_dockerd
from harness.pods import RenderedPods, pods_from_manifests, render
from specrec.v1 import recommend_pb2 as pb
from specrec.v1 import recommend_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "specrec"
NAMESPACE = "specrec"
# The chart as an operator without a GPU or an API server would install it; nothing else is overridden.
VALUES = ["--set", "triton.accelerator.kind=none", "--set", "draft.accelerator.kind=none",
          "--set", "orchestrator.routing.mode=static", "--set", "draft.replicaCount=1",
          "--set", "orchestrator.autoscaling.enabled=false", "--set", "orchestrator.replicaCount=1"]
USERS = range(8)


@pytest.fixture(scope="module")
def helm() -> str:
    out = subprocess.run([str(REPO / "scripts" / "fetch_helm.sh")], check=True, capture_output=True, text=True,
                         timeout=600).stdout
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def daemon():
    if os.geteuid() != 0:
        pytest.fail("the image tests start their own dockerd and need root (CI runs as root)")
    with running_dockerd() as daemon:
        yield daemon


@pytest.fixture(scope="module")
def images(daemon, tiny_drafter) -> dict[str, str]:
    return make_images(tiny_drafter, os.environ.get("SPECREC_BASE_IMAGE"), daemon)


@pytest.fixture(scope="module")
def pods(daemon, images, helm):
    docs = render(helm, CHART, "rec", NAMESPACE, VALUES)
    running = RenderedPods(daemon, pods_from_manifests(docs, NAMESPACE))
    assert {pod.image for pod in running.pods.values()} == {images[s] for s in ("orchestrator", "draft", "target")}
    running.start()
    try:
        running.wait_ready()
        yield running
    finally:
        running.remove()


def history(tiny_artifacts, user: int) -> list[str]:
    arts = tiny_artifacts
    return [arts.data.item_ids[i] for i in arts.split.train[user][-arts.profile.max_history:]]


def recommend(pods: RenderedPods, tiny_artifacts, policy: str) -> dict[int, pb.RecommendResponse]:
    with grpc.insecure_channel(pods.address("orchestrator")) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        return {u: stub.Recommend(pb.RecommendRequest(history=history(tiny_artifacts, u), num_items=10,
                                                      options=pb.DecodingOptions(policy=policy)), timeout=60)
                for u in USERS}


def items(responses: dict[int, pb.RecommendResponse]) -> dict[int, list[str]]:
    return {u: [i.item_id for i in r.items] for u, r in responses.items()}


def test_the_rendered_pods_answer_losslessly_through_both_backends(pods, tiny_artifacts) -> None:
    plain = recommend(pods, tiny_artifacts, "off")
    assert all(len(r.items) == 10 for r in plain.values())
    # The orchestrator is ready once it knows a Triton pod; it pairs with the drafter pod (a version probe) on its
    # own time and decodes without it until then, so allow it a while to find the drafter.
    deadline = time.monotonic() + 60
    while True:
        speculative = recommend(pods, tiny_artifacts, "adaptive")
        assert items(speculative) == items(plain)  # lossless: the drafter never changes a list
        stats = [r.stats for r in speculative.values()]
        if sum(s.tree_rounds for s in stats) > 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    # The orchestrator found the drafter: trees were drafted and accepted, never a fallback round.
    drafted = sum(s.tree_rounds for s in stats) > 0 and sum(s.accepted_tokens for s in stats) > 0
    assert drafted, pods.logs("orchestrator")
    assert sum(s.fallback_rounds for s in stats) == 0
    versions = {r.model_version for r in [*plain.values(), *speculative.values()]}
    assert len(versions) == 1 and "" not in versions


def test_a_dead_stub_ends_the_target_container_and_a_restart_serves_again(pods, tiny_artifacts) -> None:
    """Triton alone stays READY after its Python stub dies and fails every request; specrec-target must exit."""
    before = items(recommend(pods, tiny_artifacts, "off"))
    kill = ("import os, signal\n"  # no pkill in the image; this script's own cmdline names the stub too
            "for p in filter(str.isdigit, os.listdir('/proc')):\n"
            "    if int(p) != os.getpid() and b'backend_stub' in open(f'/proc/{p}/cmdline', 'rb').read():\n"
            "        os.kill(int(p), signal.SIGKILL)\n")
    pods.exec("triton", "python3", "-c", kill)
    deadline = time.monotonic() + 60
    while pods.running("triton") and time.monotonic() < deadline:
        time.sleep(0.5)
    state = pods.state("triton")
    assert not state["Running"] and state["ExitCode"] != 0, pods.logs("triton")
    pods.restart("triton")
    pods.wait_ready()
    assert items(recommend(pods, tiny_artifacts, "off")) == before


def test_a_template_without_the_drafters_address_fails_here(helm, daemon, images) -> None:
    """The check above is strict: a draft container rendered without SPECREC_HOST listens on loopback only."""
    docs = render(helm, CHART, "rec", NAMESPACE, VALUES)
    for doc in docs:
        if doc["kind"] == "Deployment" and doc["metadata"]["name"].endswith("-draft"):
            env = doc["spec"]["template"]["spec"]["containers"][0]["env"]
            env[:] = [e for e in env if e["name"] != "SPECREC_HOST"]
    draft = [p for p in pods_from_manifests(docs, NAMESPACE) if p.component == "draft"]
    broken = RenderedPods(daemon, draft, network="specrec-broken")
    broken.pods["draft"].name += "-broken"
    try:
        broken.start()
        with pytest.raises(ContainerError, match="not ready"):
            broken.wait_ready(timeout=30)
    finally:
        broken.remove()


def test_a_rebuild_leaves_no_image_of_ours_behind(daemon, images) -> None:
    """Each `make test` rebuilds the images from fresh artifacts and wheels; the images that lose their tag used to
    stay (~2.4 GB a run, 68 GB in a few days filled this machine's disk). Ours carry a label and are pruned. A tiny
    image on our base, built twice under one tag with different content, leaves its first build untagged; the prune
    must remove it (on a fresh daemon the image build above alone leaves nothing to prune)."""
    labelled = daemon.docker("images", "--format", "{{.Repository}}", "--filter", f"label={BUILD_LABEL}", quiet=True)
    assert {f"specrec/{s}" for s in ("base", "orchestrator", "draft", "target")} <= set(labelled.split())
    probe = "specrec/prune-probe:test"
    for nonce in ("1", str(time.time())):
        with tempfile.TemporaryDirectory() as ctx:
            (Path(ctx) / "Dockerfile").write_text(f"FROM specrec/base:{TAG}\nLABEL probe.nonce={nonce}\n")
            daemon.docker("build", "--network", "none", "-t", probe, ctx, quiet=True, timeout=120)
    dangling = ["images", "--quiet", "--filter", "dangling=true", "--filter", f"label={BUILD_LABEL}"]
    try:
        assert daemon.docker(*dangling, quiet=True).split(), "the probe's first build should be untagged now"
        prune_replaced_images(daemon)
        assert daemon.docker(*dangling, quiet=True).split() == []
    finally:
        daemon.docker("rmi", "--force", probe, quiet=True)
