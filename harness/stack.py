"""The local stack: Triton (through its launcher), the draft service and the orchestrator as processes
on loopback, started in order, health-checked, and stopped together. Used by `make run`, tests, benches."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specrec.security import TlsConfig, channel

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class StackConfig:
    artifacts: Path
    drafter: str = "model"
    policy: str = "adaptive"
    with_drafter: bool = True
    target_grpc: int = 0  # 0 = pick a free port
    draft_port: int = 0
    orchestrator_port: int = 0
    metrics_port: int = 0  # orchestrator /metrics; 0 = off
    draft_metrics_port: int = 0  # the draft service's /metrics; 0 = off
    target_metrics_port: int = 0  # Triton's /metrics; 0 = a free port (Triton always serves its metrics)
    log_dir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    threads: int = 1  # torch threads per service: three processes share the machine's cores
    target_threads: int = 0  # the target's own, 0 = `threads` (env SPECREC_STACK_TARGET_THREADS)
    # One identity for all three services (they get it as SPECREC_TLS_*); it is also the client
    # certificate of their calls and of the stack's health checks. None = plaintext.
    tls: TlsConfig | None = None
    token_file: Path | None = None  # bearer token the orchestrator requires on its API
    probe_ports: bool = False  # plaintext health-only ports for drafter and orchestrator (LocalStack.probe_addrs)
    # Run the services from another checkout of this repository (a worktree at another commit: bench/ab.py's A/B
    # runs); None = this one.
    code_dir: Path | None = None


class StackError(RuntimeError):
    pass


class Process:
    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, cwd: Path | None = None):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log_file = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(args, env=env, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=cwd)

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 20.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log_file.close()

    def kill(self) -> None:
        """kill -9, for fault tests."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def grpc_healthy(addr: str, service: str = "", tls: TlsConfig | None = None) -> bool:
    try:
        with channel(addr, tls or TlsConfig()) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def triton_ready(addr: str, tls: TlsConfig | None = None) -> bool:
    import tritonclient.grpc as grpcclient

    try:
        return grpcclient.InferenceServerClient(addr, **(tls or TlsConfig()).triton_kwargs()).is_model_ready(
            "specrec_target")
    except Exception:
        return False


class LocalStack:
    def __init__(self, config: StackConfig):
        self.config = config
        self.procs: dict[str, Process] = {}
        c = config
        self.target_addr = f"127.0.0.1:{c.target_grpc or free_port()}"
        self.draft_addr = f"127.0.0.1:{c.draft_port or free_port()}" if c.with_drafter else ""
        self.orchestrator_addr = f"127.0.0.1:{c.orchestrator_port or free_port()}"
        self.target_metrics_port = c.target_metrics_port or free_port()
        self.probe_addrs = {name: f"127.0.0.1:{free_port()}" for name in ("draft", "orchestrator")} \
            if c.probe_ports else {}
        self.log_dir = c.log_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"specrec-stack-{os.getpid()}"
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"SPECREC_ARTIFACTS": str(self.config.artifacts), "SPECREC_TORCH_THREADS": str(self.config.threads),
                    "OMP_NUM_THREADS": str(self.config.threads)})
        if self.config.tls is not None:
            t = self.config.tls
            env.update({"SPECREC_TLS_CERT": t.cert, "SPECREC_TLS_KEY": t.key, "SPECREC_TLS_CA": t.ca,
                        "SPECREC_TLS_CLIENT_AUTH": "1" if t.client_auth else "0",
                        "SPECREC_TLS": "1" if t.system_roots else "0"})
        if self.config.code_dir is not None:  # `python -m` imports from the working directory first; so do children
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.config.code_dir), env.get("PYTHONPATH")]))
        env.update(self.config.extra_env)
        return env

    @property
    def tls(self) -> TlsConfig:
        return self.config.tls or TlsConfig()

    def start_target(self) -> None:
        port = self.target_addr.rsplit(":", 1)[1]
        args = [sys.executable, "-m", "target_service.launch", "--artifacts", str(self.config.artifacts),
                "--grpc-port", port, "--http-port", str(free_port()), "--metrics-port", str(self.target_metrics_port)]
        threads = str(self.config.target_threads or int(os.environ.get("SPECREC_STACK_TARGET_THREADS", "0"))
                      or self.config.threads)
        env = {**self._env(), "SPECREC_TORCH_THREADS": threads, "OMP_NUM_THREADS": threads}
        self.procs["target"] = Process("target", args, env, self.log_dir, self.config.code_dir)
        self._wait("target", lambda: triton_ready(self.target_addr, self.tls), 180)

    def start_drafter(self) -> None:
        if not self.config.with_drafter:
            return
        port = self.draft_addr.rsplit(":", 1)[1]
        args = [sys.executable, "-m", "draft_service.server", "--port", port, "--artifacts",
                str(self.config.artifacts), "--drafter", self.config.drafter, *self._probe_arg("draft"),
                "--metrics-port", str(self.config.draft_metrics_port)]
        self.procs["draft"] = Process("draft", args, self._env(), self.log_dir, self.config.code_dir)
        self._wait("draft", lambda: grpc_healthy(self.draft_addr, tls=self.tls), 120)

    def start_orchestrator(self) -> None:
        port = self.orchestrator_addr.rsplit(":", 1)[1]
        args = [sys.executable, "-m", "orchestrator.server", "--port", port, "--artifacts",
                str(self.config.artifacts), "--target-addr", self.target_addr, "--draft-addr", self.draft_addr,
                "--policy", self.config.policy, "--metrics-port", str(self.config.metrics_port)]
        args += self._probe_arg("orchestrator")
        if self.config.with_drafter:  # named, so its metrics say which drafter served (not "default")
            args += ["--drafter", self.config.drafter]
        if self.config.token_file is not None:
            args += ["--token-file", str(self.config.token_file)]
        self.procs["orchestrator"] = Process("orchestrator", args, self._env(), self.log_dir, self.config.code_dir)
        self._wait("orchestrator", lambda: grpc_healthy(self.orchestrator_addr, tls=self.tls), 60)

    def metrics_urls(self) -> dict[str, str]:
        """/metrics of each running service that serves one (the orchestrator's and drafter's only when asked for)."""
        ports = {"orchestrator": self.config.metrics_port, "target": self.target_metrics_port}
        if self.config.with_drafter:
            ports["draft"] = self.config.draft_metrics_port
        return {name: f"http://127.0.0.1:{port}/metrics" for name, port in ports.items() if port}

    def _probe_arg(self, name: str) -> list[str]:
        return ["--probe-port", self.probe_addrs[name].rsplit(":", 1)[1]] if name in self.probe_addrs else []

    def start(self) -> LocalStack:
        try:
            self.start_target()
            self.start_drafter()
            self.start_orchestrator()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, name: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        proc = self.procs[name]
        while time.monotonic() < deadline:
            if not proc.alive():
                raise StackError(f"{name} exited with code {proc.proc.returncode}; its log "
                                 f"({proc.log_path}) ends with:\n{proc.tail()}")
            if ready():
                log.info("%s ready", name)
                return
            time.sleep(0.25)
        raise StackError(f"{name} not ready after {timeout:.0f} s; its log ({proc.log_path}) ends with:\n{proc.tail()}")

    def stop(self) -> None:
        for name in ("orchestrator", "draft", "target"):  # clients first, so nothing calls a stopped peer
            if name in self.procs:
                self.procs[name].stop()

    def live_counts(self) -> tuple[int, int]:
        """(drafter live sessions, target live sequences) as the services themselves report them: what a request
        that ended, failed or was cancelled must not leave behind."""
        import asyncio

        from specrec.draft.v1 import draft_pb2, draft_pb2_grpc
        from specrec.target_client import TargetClient

        sessions = 0
        if self.draft_addr:
            with grpc.insecure_channel(self.draft_addr) as ch:
                stub = draft_pb2_grpc.DraftServiceStub(ch)
                sessions = stub.Stats(draft_pb2.StatsRequest(), timeout=5).live_sessions

        async def probe() -> int:  # a throwaway sequence: its END answer reports what is left alive
            client = TargetClient(self.target_addr)
            try:
                await client.verify(2**62, [], [], context=[1, 4], start=True)
                return (await client.verify(2**62, [], [], end=True)).live_sequences
            finally:
                await client.close()

        return sessions, asyncio.run(probe())

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
