"""Run the chart's Deployments as containers: each pod's image, command, args, env, user and volumes exactly as
`helm template` renders them, on a private docker network where each Service's DNS name points at its pod.

Nothing is invented: a container gets only what its manifest says, so a template that forgets an env var, a port or
a volume fails here as it would in a cluster. What a kubelet adds and docker cannot (probes, restarts, Service
load balancing) the caller does: `wait_ready` runs the readiness probes, `restart` restarts a container.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.containers import ContainerError, Dockerd, docker_cli


@dataclass
class Pod:
    """One Deployment's first container, as docker runs it."""

    component: str  # app.kubernetes.io/component
    name: str  # the container (and docker container) name
    image: str
    run_args: list[str]
    readiness: dict[str, Any]
    ports: dict[str, int]  # the container's named ports
    aliases: list[str] = field(default_factory=list)
    ip: str = ""


def render(helm: str, chart: Path, release: str, namespace: str, values: list[str]) -> list[dict[str, Any]]:
    out = subprocess.run([helm, "template", release, str(chart), "--namespace", namespace, *values],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def pods_from_manifests(docs: list[dict[str, Any]], namespace: str) -> list[Pod]:
    """A Pod per Deployment; Services become DNS aliases of the pods they select (their ports must match)."""
    services = [d for d in docs if d["kind"] == "Service"]
    pods = []
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        template = deployment["spec"]["template"]
        spec, labels = template["spec"], template["metadata"]["labels"]
        if spec.get("initContainers"):
            raise ContainerError(f"{deployment['metadata']['name']}: init containers are not emulated")
        container = spec["containers"][0]
        aliases = []
        for service in services:
            selector = service["spec"].get("selector", {})
            if selector and all(labels.get(k) == v for k, v in selector.items()):
                _check_ports(service, container)
                name = service["metadata"]["name"]
                aliases += [name, f"{name}.{namespace}", f"{name}.{namespace}.svc"]
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        pods.append(Pod(labels["app.kubernetes.io/component"], deployment["metadata"]["name"], container["image"],
                        _run_args(spec, container, namespace), container.get("readinessProbe", {}), ports, aliases))
    return pods


def _check_ports(service: dict[str, Any], container: dict[str, Any]) -> None:
    """Containers reach a Service's name:port straight at the pod, so port and target port must agree here."""
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        target = named.get(target, target)
        if target != port["port"]:
            raise ContainerError(f"Service {service['metadata']['name']}: port {port['port']} -> {target} "
                                 "cannot be emulated without kube-proxy")


def _run_args(spec: dict[str, Any], container: dict[str, Any], namespace: str) -> list[str]:
    pod_sc, sc = spec.get("securityContext", {}), container.get("securityContext", {})
    args = ["--user", f"{sc.get('runAsUser', pod_sc.get('runAsUser', 0))}:"
                      f"{sc.get('runAsGroup', pod_sc.get('runAsGroup', 0))}"]
    if sc.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    for cap in sc.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", cap]
    for env in container.get("env", []):
        args += ["--env", f"{env['name']}={_env_value(env, namespace)}"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        args += _mount(volumes[mount["name"]], mount)
    command = container.get("command", [])
    if command:
        args += ["--entrypoint", command[0]]
    return [*args, container["image"], *command[1:], *container.get("args", [])]


def _env_value(env: dict[str, Any], namespace: str) -> str:
    if "value" in env:
        return str(env["value"])
    ref = env.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    if ref == "metadata.namespace":
        return namespace
    raise ContainerError(f"env {env['name']}: only values and the namespace fieldRef are emulated, got {env}")


def _mount(volume: dict[str, Any], mount: dict[str, Any]) -> list[str]:
    if "emptyDir" not in volume:
        raise ContainerError(f"volume {volume['name']}: only emptyDir is emulated (run without PVCs and Secrets)")
    size = volume["emptyDir"].get("sizeLimit", "1Gi").replace("Mi", "m").replace("Gi", "g")
    # An emptyDir allows exec (Triton's backend links live under /tmp); docker's tmpfs default is noexec.
    return ["--tmpfs", f"{mount['mountPath']}:rw,exec,nosuid,size={size}"]


class RenderedPods:
    """Start, probe, restart and remove the rendered pods on one daemon."""

    def __init__(self, daemon: Dockerd, pods: list[Pod], network: str = "specrec-pods") -> None:
        self.daemon, self.pods, self.network = daemon, {p.component: p for p in pods}, network

    def start(self) -> RenderedPods:
        self.remove()
        self.daemon.docker("network", "create", self.network)
        for pod in self.pods.values():
            aliases = [a for alias in pod.aliases for a in ("--network-alias", alias)]
            self.daemon.docker("run", "-d", "--name", pod.name, "--network", self.network, *aliases, *pod.run_args)
            pod.ip = self._ip(pod)
        return self

    def _ip(self, pod: Pod) -> str:
        info = json.loads(self.daemon.docker("inspect", pod.name))[0]
        return info["NetworkSettings"]["Networks"][self.network]["IPAddress"]

    def logs(self, component: str, lines: int = 40) -> str:
        proc = subprocess.run([docker_cli(), "logs", "--tail", str(lines), self.pods[component].name],
                              env=self.daemon.env, capture_output=True, text=True)
        return proc.stdout + proc.stderr

    def address(self, component: str, port_name: str = "grpc") -> str:
        """ip:port of a pod's named port, reachable from this machine over the bridge."""
        pod = self.pods[component]
        return f"{pod.ip}:{pod.ports[port_name]}"

    def is_ready(self, component: str) -> bool:
        """The rendered readiness probe, run from here (the kubelet's job)."""
        pod, probe = self.pods[component], self.pods[component].readiness
        try:
            if "grpc" in probe:
                with grpc.insecure_channel(f"{pod.ip}:{probe['grpc']['port']}") as channel:
                    request = health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", ""))
                    status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status
                    return status == health_pb2.HealthCheckResponse.SERVING
            if "httpGet" in probe:
                port = probe["httpGet"]["port"]
                port = pod.ports[port] if isinstance(port, str) else port
                url = f"http://{pod.ip}:{port}{probe['httpGet']['path']}"
                with urllib.request.urlopen(url, timeout=2) as resp:
                    return resp.status == 200
        except (grpc.RpcError, OSError):
            return False
        raise ContainerError(f"{component}: readiness probe {probe} is not emulated")

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.pods)
        while pending and time.monotonic() < deadline:
            for component in sorted(pending):
                if not self.running(component):
                    raise ContainerError(f"{component} exited:\n{self.logs(component)}")
                if self.is_ready(component):
                    pending.discard(component)
            time.sleep(1.0)
        if pending:
            details = "\n".join(f"--- {c}\n{self.logs(c)}" for c in sorted(pending))
            raise ContainerError(f"not ready after {timeout:.0f} s: {', '.join(sorted(pending))}\n{details}")

    def state(self, component: str) -> dict[str, Any]:
        return json.loads(self.daemon.docker("inspect", self.pods[component].name))[0]["State"]

    def running(self, component: str) -> bool:
        return bool(self.state(component)["Running"])

    def restart(self, component: str) -> None:
        """What the kubelet does for an exited container (restartPolicy Always): start it again."""
        pod = self.pods[component]
        self.daemon.docker("start", pod.name)
        pod.ip = self._ip(pod)

    def exec(self, component: str, *cmd: str) -> str:
        return self.daemon.docker("exec", self.pods[component].name, *cmd)

    def remove(self) -> None:
        for pod in self.pods.values():
            subprocess.run([docker_cli(), "rm", "-f", pod.name], env=self.daemon.env, capture_output=True)
        subprocess.run([docker_cli(), "network", "rm", self.network], env=self.daemon.env, capture_output=True)
