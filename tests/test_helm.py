"""The Helm chart, checked with the real helm binary: lint, render, validate, and what the manifests say."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate.utils import latest_version

from orchestrator.config import ROUTING_MODES

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "specrec"
RELEASE, NAMESPACE = "rec", "specrec"
# The newest Kubernetes the installed kubernetes-validate has schemas for; helm renders for it too.
KUBE_VERSION = latest_version()
SCENARIOS = ["default", *sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))]
# Kinds from CRDs (Prometheus Operator) have no schema in kubernetes-validate.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def test_ci_scenarios_cover_cpu_gpu_and_mig() -> None:
    assert {"cpu-only", "whole-gpus", "mig", "tls"} <= set(SCENARIOS)


@pytest.fixture(scope="session")
def helm() -> str:
    fetched = subprocess.run(
        [str(REPO / "scripts" / "fetch_helm.sh")], check=True, capture_output=True, text=True, timeout=600
    )
    return fetched.stdout.strip().splitlines()[-1]


def values_args(scenario: str) -> list[str]:
    return [] if scenario == "default" else ["-f", str(CHART / "ci" / f"{scenario}-values.yaml")]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def scenario_values(scenario: str) -> dict[str, Any]:
    """The values a scenario renders with: values.yaml overlaid with its ci file (maps merge, lists replace)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if scenario != "default":
        values = deep_merge(values, yaml.safe_load((CHART / "ci" / f"{scenario}-values.yaml").read_text()))
    return values


class Rendered:
    """One scenario's manifests, as a file (for the validator) and as parsed documents."""

    def __init__(self, path: Path, docs: list[dict[str, Any]], values: dict[str, Any]) -> None:
        self.path, self.docs, self.values = path, docs, values

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, component: str) -> dict[str, Any]:
        name = f"{RELEASE}-specrec-{component}"
        found = [d for d in self.all(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
        return found[0]

    def find(self, kind: str, component: str) -> dict[str, Any] | None:
        name = f"{RELEASE}-specrec-{component}"
        return next((d for d in self.all(kind) if d["metadata"]["name"] == name), None)

    def container(self, component: str) -> dict[str, Any]:
        pod = self.get("Deployment", component)["spec"]["template"]["spec"]
        return next(c for c in pod["containers"] if c["name"] == component)


@pytest.fixture(scope="session")
def rendered(helm: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rendered]:
    out = tmp_path_factory.mktemp("helm")
    result = {}
    for scenario in SCENARIOS:
        text = subprocess.run(
            [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION,
             *values_args(scenario)],
            check=True, capture_output=True, text=True, timeout=120,
        ).stdout
        path = out / f"{scenario}.yaml"
        path.write_text(text)
        docs = [d for d in yaml.safe_load_all(text) if d]
        result[scenario] = Rendered(path, docs, scenario_values(scenario))
    return result


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBE_VERSION, str(path)],
        capture_output=True, text=True, timeout=300,
    )


# ----------------------------------------------------------------------------------------------
# lint, schema, validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_strict(helm: str, scenario: str) -> None:
    lint = subprocess.run(
        [helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *values_args(scenario)],
        capture_output=True, text=True, timeout=120,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "0 chart(s) failed" in lint.stdout


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_manifest_validates_strictly(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    result = validate(r.path)
    assert result.returncode == 0, result.stdout + result.stderr
    core = [d for d in r.docs if d["kind"] not in CRD_KINDS]
    passed = [line for line in result.stdout.splitlines() if line.startswith("INFO") and " passed " in line]
    assert len(passed) == len(core), result.stdout
    # The only resources without a schema are the CRD kinds; nothing else may be skipped.
    for line in result.stdout.splitlines():
        if line.startswith("WARN"):
            assert any(f"kind {kind} " in line for kind in CRD_KINDS), line


def test_validator_is_strict(rendered: dict[str, Rendered], tmp_path: Path) -> None:
    # Guard against a validator that passes everything: an unknown field must fail.
    deployment = copy.deepcopy(rendered["default"].get("Deployment", "triton"))
    deployment["spec"]["template"]["spec"]["containers"][0]["shmSize"] = "1Gi"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deployment))
    result = validate(path)
    assert result.returncode != 0 and "shmSize" in result.stdout


def test_bad_values_are_rejected_by_the_schema_with_a_readable_message(helm: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad-values.yaml"
    bad.write_text("draft:\n  accelerator:\n    kind: tpu\norchestrator:\n  replicas: 3\n")
    result = subprocess.run(
        [helm, "template", RELEASE, str(CHART), "-f", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    # Each mistake is named by its path and says what was expected.
    assert "at '/draft/accelerator/kind': value must be one of 'none', 'gpu', 'mig'" in result.stderr
    assert "at '/orchestrator': additional properties 'replicas' not allowed" in result.stderr


def test_shm_region_larger_than_dev_shm_is_refused(helm: str) -> None:
    result = subprocess.run(
        [helm, "template", RELEASE, str(CHART), "--set", "triton.shm.pythonDefaultMiB=2048"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "triton.shm.pythonDefaultMiB (2048) must not exceed triton.shm.sizeMiB (1024)" in result.stderr


# ----------------------------------------------------------------------------------------------
# what the manifests say
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_triton_dev_shm_is_memory_sized_like_the_python_backend_args(
    rendered: dict[str, Rendered], scenario: str
) -> None:
    r = rendered[scenario]
    shm = r.values["triton"]["shm"]
    pod = r.get("Deployment", "triton")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert volume["emptyDir"] == {"medium": "Memory", "sizeLimit": f"{shm['sizeMiB']}Mi"}
    triton = r.container("triton")
    assert {"name": "dshm", "mountPath": "/dev/shm"} in triton["volumeMounts"]
    args = triton["args"]
    assert triton["command"] == ["specrec-target"]  # the launcher: it watches the stubs, bare tritonserver does not
    assert f"--shm-mb={shm['pythonDefaultMiB']}" in args and f"--shm-growth-mb={shm['pythonGrowthMiB']}" in args


# Per scenario and component: the extended resource and count in limits, or None for CPU only.
EXPECTED_ACCELERATORS: dict[str, dict[str, tuple[str, int] | None]] = {
    "default": {"draft": ("nvidia.com/gpu", 1), "triton": ("nvidia.com/gpu", 1)},
    "cpu-only": {"draft": None, "triton": None},
    "whole-gpus": {"draft": ("nvidia.com/gpu", 1), "triton": ("nvidia.com/gpu", 2)},
    "mig": {"draft": ("nvidia.com/mig-1g.10gb", 1), "triton": ("nvidia.com/mig-3g.40gb", 1)},
    "tls": {"draft": ("nvidia.com/gpu", 1), "triton": ("nvidia.com/gpu", 1)},
    "monitoring": {"draft": ("nvidia.com/gpu", 1), "triton": ("nvidia.com/gpu", 1)},
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_gpu_resources_where_asked_and_nowhere_else(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    for component, expected in EXPECTED_ACCELERATORS[scenario].items():
        resources = r.container(component)["resources"]
        gpus = {k: v for part in resources.values() for k, v in part.items() if k.startswith("nvidia.com/")}
        tolerations = r.get("Deployment", component)["spec"]["template"]["spec"].get("tolerations", [])
        tolerates_gpu = any(t.get("key") == "nvidia.com/gpu" for t in tolerations)
        if expected is None:
            assert gpus == {} and not tolerates_gpu, (component, resources, tolerations)
        else:
            # Extended resources go in limits (Kubernetes sets requests equal).
            assert gpus == {expected[0]: expected[1]} and resources["limits"][expected[0]] == expected[1]
            assert tolerates_gpu
    orchestrator = r.container("orchestrator")["resources"]
    assert not any(k.startswith("nvidia.com/") for part in orchestrator.values() for k in part)


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_network_policies_let_only_the_orchestrator_reach_draft_and_triton(
    rendered: dict[str, Rendered], scenario: str
) -> None:
    r = rendered[scenario]
    pod_labels = {
        c: r.get("Deployment", c)["spec"]["template"]["metadata"]["labels"] for c in ("orchestrator", "draft", "triton")
    }
    for component in ("orchestrator", "draft", "triton"):
        policy = r.get("NetworkPolicy", component)["spec"]
        # The policy applies to exactly this component's pods.
        selector = policy["podSelector"]["matchLabels"]
        assert selector == r.get("Deployment", component)["spec"]["selector"]["matchLabels"]
        assert [c for c, labels in pod_labels.items() if _selects(selector, labels)] == [component]
        assert policy["policyTypes"] == ["Ingress"]
        by_port = {rule["ports"][0]["port"]: rule for rule in policy["ingress"]}
        assert all(rule["ports"] == [{"port": port, "protocol": "TCP"}] for port, rule in by_port.items())
        grpc_rules, metrics_rules = [by_port["grpc"]], [by_port["metrics"]]
        assert len(grpc_rules) == 1 and len(metrics_rules) == 1 and len(policy["ingress"]) == 2
        assert metrics_rules[0]["from"] == r.values["networkPolicy"]["metricsScrapers"]
        peers = grpc_rules[0]["from"]
        if component == "orchestrator":
            assert peers == r.values["networkPolicy"]["clients"]
            assert not any(_selects(p["podSelector"]["matchLabels"], pod_labels["draft"]) for p in peers)
        else:
            # One peer, a pod selector in the release namespace that matches the orchestrator only.
            assert len(peers) == 1 and set(peers[0]) == {"podSelector"}
            peer = peers[0]["podSelector"]["matchLabels"]
            assert [c for c, labels in pod_labels.items() if _selects(peer, labels)] == ["orchestrator"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_probes_hit_triton_health_endpoints_and_grpc_health(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    triton = r.container("triton")
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert triton["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    for component, port in (("orchestrator", 50051), ("draft", 50052)):
        # kubelet's gRPC probe cannot speak TLS: with TLS on it checks the plaintext health-only port
        port = r.values["tls"]["probePort"] if r.values["tls"]["enabled"] else port
        container = r.container(component)
        # the orchestrator is ready only with a Triton pod to send to (its Recommender health service)
        ready = {"port": port, "service": "specrec.v1.RecommenderService"} if component == "orchestrator" \
            else {"port": port}
        assert container["readinessProbe"]["grpc"] == ready
        assert container["livenessProbe"]["grpc"] == {"port": port}


def test_tracing_is_off_by_default() -> None:
    otel = scenario_values("default")["otel"]
    assert otel["endpoint"] == "" and otel["tritonEndpoint"] == ""


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_triton_tracing_flags(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    args = r.container("triton")["args"]
    otel = r.values["otel"]
    env = {e["name"]: e.get("value") for e in r.container("orchestrator")["env"]}
    if otel["tritonEndpoint"]:
        # specrec-target turns these into Triton's --trace-config flags (tests/test_launcher.py).
        assert f"--trace-url={otel['tritonEndpoint']}" in args
        # Triton starts no trace of its own: it joins the orchestrator's sampled ones.
        assert f"--trace-rate={otel['tritonRate']}" in args and otel["tritonRate"] >= 1000
    else:
        assert not any(a.startswith("--trace") for a in args)
    if otel["endpoint"]:
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == otel["endpoint"]
        assert env["OTEL_TRACES_SAMPLER_ARG"] == str(otel["samplerRatio"])
    else:
        assert env["OTEL_SDK_DISABLED"] == "true" and "OTEL_EXPORTER_OTLP_ENDPOINT" not in env


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_orchestrator_is_wired_to_draft_and_triton(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    env = {e["name"]: e for e in r.container("orchestrator")["env"]}
    draft_svc, triton_svc = r.get("Service", "draft"), r.get("Service", "triton")
    assert env["SPECREC_DRAFT_ADDR"]["value"] == f"{draft_svc['metadata']['name']}.{NAMESPACE}.svc:50052"
    assert env["SPECREC_TARGET_ADDR"]["value"] == f"{triton_svc['metadata']['name']}.{NAMESPACE}.svc:8001"
    assert env["SPECREC_DRAFT_SERVICE"]["value"] == draft_svc["metadata"]["name"]
    assert env["SPECREC_TARGET_SERVICE"]["value"] == triton_svc["metadata"]["name"]
    assert env["SPECREC_ARTIFACTS"]["value"] == r.values["artifacts"]["path"]
    assert env["SPECREC_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # Per-pod routing needs headless Services whose gRPC port is named as the router expects.
    for svc in (draft_svc, triton_svc):
        assert svc["spec"]["clusterIP"] == "None"
        assert any(p["name"] == "grpc" for p in svc["spec"]["ports"])
    mode = r.values["orchestrator"]["routing"]["mode"]
    assert env["SPECREC_ROUTING"]["value"] == mode
    assert mode in ROUTING_MODES  # a mode the orchestrator accepts (its --routing choices)
    role = r.find("Role", "orchestrator")
    pod = r.get("Deployment", "orchestrator")["spec"]["template"]["spec"]
    if mode == "endpointslices":
        assert role is not None and role["rules"] == [
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
        ]
        binding = r.get("RoleBinding", "orchestrator")
        assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
        # The binding grants exactly that Role, to the orchestrator's ServiceAccount, in the release namespace
        # (the router watches EndpointSlices there: SPECREC_NAMESPACE is the pod's own namespace).
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": role["metadata"]["name"]}
        assert binding["subjects"][0]["kind"] == "ServiceAccount"
        assert role["metadata"]["namespace"] == binding["subjects"][0]["namespace"] == NAMESPACE
        if r.values["orchestrator"]["serviceAccount"]["create"]:
            assert any(sa["metadata"]["name"] == pod["serviceAccountName"] for sa in r.all("ServiceAccount"))
        assert pod["automountServiceAccountToken"] is True
    else:
        assert role is None and pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_are_locked_down_and_drain_on_shutdown(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    shutdown = r.values["shutdown"]
    for deployment in r.all("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"] + pod.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert "limits" in container["resources"] and "memory" in container["resources"]["limits"]
        for container in pod["containers"]:
            assert container["lifecycle"]["preStop"] == {"sleep": {"seconds": shutdown["preStopSleepSeconds"]}}
        grace = shutdown["preStopSleepSeconds"] + shutdown["drainSeconds"] + 5
        assert pod["terminationGracePeriodSeconds"] == grace
    assert f"--exit-timeout={shutdown['drainSeconds']}" in r.container("triton")["args"]
    # Every component has a PDB selecting its pods.
    for component in ("orchestrator", "draft", "triton"):
        pdb = r.get("PodDisruptionBudget", component)
        assert pdb["spec"]["selector"] == r.get("Deployment", component)["spec"]["selector"]
    hpa = r.find("HorizontalPodAutoscaler", "orchestrator")
    if r.values["orchestrator"]["autoscaling"]["enabled"]:
        assert hpa is not None and hpa["apiVersion"] == "autoscaling/v2"
        assert "replicas" not in r.get("Deployment", "orchestrator")["spec"]
    else:
        assert hpa is None


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_service_is_told_where_to_listen_and_what_to_run_on(rendered: dict[str, Rendered], scenario: str) -> None:
    """What the programs cannot guess: the pod's address and ports, the device its accelerator gives, Triton's sizes.

    (tests/test_images.py runs the rendered containers; this names what each must carry.)
    """
    r = rendered[scenario]
    for component, prefix in (("orchestrator", "SPECREC_ORCHESTRATOR"), ("draft", "SPECREC_DRAFT")):
        env, ports = _env(r.container(component)), r.values[component]["containerPorts"]
        assert env["SPECREC_HOST"] == "0.0.0.0"  # loopback, the programs' default, is unreachable from the kubelet
        assert (env[f"{prefix}_PORT"], env[f"{prefix}_METRICS_PORT"]) == (str(ports["grpc"]), str(ports["metrics"]))
    triton, values = _env(r.container("triton")), r.values["triton"]
    assert triton["SPECREC_ARTIFACTS"] == r.values["artifacts"]["path"]
    assert (triton["SPECREC_TARGET_INSTANCES"], triton["SPECREC_TARGET_MAX_SEQUENCES"]) == \
        (str(values["instances"]), str(values["maxSequences"]))
    assert triton["SPECREC_TARGET_QUEUE_DELAY_US"] == str(values["queueDelayMicroseconds"])
    for component in ("draft", "triton"):
        on_gpu = r.values[component]["accelerator"]["kind"] != "none"
        assert _env(r.container(component))["SPECREC_DEVICE"] == ("cuda" if on_gpu else "cpu")
        assert r.get("Deployment", component)["spec"]["strategy"] == r.values[component]["strategy"]
    orchestrator = r.values["orchestrator"]
    assert _env(r.container("orchestrator"))["SPECREC_MAX_CONNECTION_AGE_S"] == \
        str(orchestrator["maxConnectionAgeSeconds"])
    hpa = r.find("HorizontalPodAutoscaler", "orchestrator")
    if hpa is not None and orchestrator["autoscaling"]["metric"] == "inFlight":
        (metric,) = hpa["spec"]["metrics"]
        assert metric["pods"]["metric"]["name"] == "specrec_requests_in_flight"
        share = orchestrator["autoscaling"]["targetInFlightPercent"] / 100
        assert metric["pods"]["target"]["averageValue"] == str(int(orchestrator["maxInFlight"] * share))


def test_gpu_rollouts_need_no_spare_gpu_by_default(rendered: dict[str, Rendered]) -> None:
    for component in ("draft", "triton"):
        strategy = rendered["default"].get("Deployment", component)["spec"]["strategy"]
        assert strategy["rollingUpdate"]["maxSurge"] == 0


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_tls_secrets_are_mounted_and_every_hop_is_told_to_use_them(
    rendered: dict[str, Rendered], scenario: str
) -> None:
    r = rendered[scenario]
    tls, auth = r.values["tls"], r.values["auth"]
    for component in ("orchestrator", "draft", "triton"):
        pod = r.get("Deployment", component)["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["name"]: m for m in r.container(component)["volumeMounts"]}
        if not tls["enabled"]:
            assert "tls" not in volumes and "tls" not in mounts
            assert not any(k.startswith("SPECREC_TLS") for k in _env(r.container(component)))
            continue
        # The component's own Secret, read-only, never world-readable.
        assert volumes["tls"]["secret"] == {"secretName": tls[component]["secretName"], "defaultMode": 0o440}
        assert mounts["tls"] == {"name": "tls", "mountPath": tls["mountPath"], "readOnly": True}
    triton_env = _env(r.container("triton"))
    if tls["enabled"]:
        files = {name: f"{tls['mountPath']}/{name}" for name in ("tls.crt", "tls.key", "ca.crt")}
        # specrec-target turns these into tritonserver's --grpc-use-ssl[-mutual] flags.
        assert (triton_env["SPECREC_TLS_CERT"], triton_env["SPECREC_TLS_KEY"], triton_env["SPECREC_TLS_CA"]) == \
            (files["tls.crt"], files["tls.key"], files["ca.crt"])
        assert triton_env["SPECREC_TLS_CLIENT_AUTH"] == ("1" if tls["mutual"] else "0")
        for component, client_auth in (("orchestrator", tls["clientAuthOnApi"]), ("draft", tls["mutual"])):
            env = _env(r.container(component))
            assert (env["SPECREC_TLS_CERT"], env["SPECREC_TLS_KEY"], env["SPECREC_TLS_CA"]) == \
                (files["tls.crt"], files["tls.key"], files["ca.crt"])
            assert env["SPECREC_TLS_CLIENT_AUTH"] == ("1" if client_auth else "0")
            assert env["SPECREC_PROBE_PORT"] == str(tls["probePort"])
        # The orchestrator checks its peers against their Service names, also when it dials pod IPs.
        env = _env(r.container("orchestrator"))
        assert env["SPECREC_DRAFT_TLS_NAME"] == f"{r.get('Service', 'draft')['metadata']['name']}.{NAMESPACE}.svc"
        assert env["SPECREC_TARGET_TLS_NAME"] == f"{r.get('Service', 'triton')['metadata']['name']}.{NAMESPACE}.svc"
    else:
        assert not any(k.startswith("SPECREC_TLS") for k in triton_env)
    orchestrator = r.get("Deployment", "orchestrator")["spec"]["template"]["spec"]
    token_volume = next((v for v in orchestrator["volumes"] if v["name"] == "auth-token"), None)
    env = _env(r.container("orchestrator"))
    if auth["enabled"]:
        assert token_volume is not None and token_volume["secret"]["secretName"] == auth["existingSecret"]
        assert token_volume["secret"]["items"] == [{"key": auth["secretKey"], "path": "token"}]
        mount = next(m for m in r.container("orchestrator")["volumeMounts"] if m["name"] == "auth-token")
        assert mount["readOnly"] is True and env["SPECREC_AUTH_TOKEN_FILE"] == f"{mount['mountPath']}/token"
    else:
        assert token_volume is None and "SPECREC_AUTH_TOKEN_FILE" not in env
    # Secrets reach the pods as files only: no env var carries a secret value.
    for component in ("orchestrator", "draft", "triton"):
        assert not any("secretKeyRef" in str(e.get("valueFrom", {})) for e in r.container(component).get("env", []))


def test_tls_leaves_the_network_policies_as_they_were(rendered: dict[str, Rendered]) -> None:
    assert rendered["tls"].values["tls"]["enabled"] and not rendered["default"].values["tls"]["enabled"]
    for component in ("orchestrator", "draft", "triton"):
        assert rendered["tls"].get("NetworkPolicy", component) == rendered["default"].get("NetworkPolicy", component)


@pytest.mark.parametrize("values, message", [
    (["--set", "tls.enabled=true,tls.orchestrator.secretName=o,tls.triton.secretName=t"],
     "tls.draft.secretName is required when tls.enabled is true"),
    (["--set", "auth.enabled=true"], "auth.existingSecret is required when auth.enabled is true"),
])
def test_tls_and_auth_without_their_secret_are_refused(helm: str, values: list[str], message: str) -> None:
    result = subprocess.run([helm, "template", RELEASE, str(CHART), *values], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and message in result.stderr


def test_service_monitors_scrape_each_metrics_port(rendered: dict[str, Rendered]) -> None:
    r = rendered["mig"]
    assert r.values["serviceMonitor"]["enabled"]
    for component in ("orchestrator", "draft", "triton"):
        monitor = r.get("ServiceMonitor", component)
        service = r.get("Service", component)
        assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
        assert any(p["name"] == "metrics" for p in service["spec"]["ports"])
    assert rendered["default"].all("ServiceMonitor") == []


def test_dashboard_and_alerts_are_optional(rendered: dict[str, Rendered]) -> None:
    r = rendered["monitoring"]
    assert r.get("ConfigMap", "dashboard")["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert r.all("PrometheusRule") and r.values["prometheusRule"]["labels"]["release"] == "kube-prometheus-stack"
    assert r.all("PrometheusRule")[0]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    default = rendered["default"]
    assert default.find("ConfigMap", "dashboard") is None and default.all("PrometheusRule") == []


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_orchestrators_never_admit_more_than_triton_holds(rendered: dict[str, Rendered], scenario: str) -> None:
    """Admission is per orchestrator pod; past what Triton holds, requests wait out their deadline in its backlog."""
    o, t = rendered[scenario].values["orchestrator"], rendered[scenario].values["triton"]
    replicas = o["autoscaling"]["maxReplicas"] if o["autoscaling"]["enabled"] else o["replicaCount"]
    assert replicas * o["maxInFlight"] <= t["replicaCount"] * t["instances"] * t["maxSequences"]


def test_install_warns_when_orchestrators_can_admit_more_than_triton_holds(helm: str) -> None:
    def notes(*values: str) -> str:
        return subprocess.run([helm, "install", "--dry-run", RELEASE, str(CHART), *values], check=True,
                              capture_output=True, text=True, timeout=120).stdout

    assert "WARNING: admission" not in notes()
    assert "10 orchestrators x maxInFlight 32 = 320" in notes("--set", "orchestrator.autoscaling.maxReplicas=10")
