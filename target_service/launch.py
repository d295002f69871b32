"""Start NVIDIA Triton serving specrec_target: find the binary, assemble the Python backend, wait until ready."""

from __future__ import annotations

import argparse
import collections
import ctypes
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from specrec.paths import specrec_home
from specrec.security import SecurityConfigError, TlsConfig, add_tls_args, tls_from_args
from target_service.stub_watch import StubWatch

if TYPE_CHECKING:
    import tritonclient.grpc as grpcclient

log = logging.getLogger("specrec.target.launch")

MODEL_NAME = "specrec_target"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPOSITORY = Path(__file__).resolve().parent / "model_repository"
CONTAINER_BACKENDS = Path("/opt/tritonserver/backends")
PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
STUB = "triton_python_backend_stub"
MB = 1 << 20
# Triton does not exit when it cannot bind a port: it logs this and hangs.
BIND_FAILURES = ("Failed to add any wildcard listeners", "No address added out of total")


class TritonLaunchError(RuntimeError):
    """Triton could not be found, or did not become ready; the message says why."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the server binary, its libraries and its backends are."""

    binary: Path
    backend_dir: Path | None  # None: the binary's built-in default (NVIDIA's image)
    lib_dirs: tuple[Path, ...] = ()
    wheel: bool = False  # from nvidia-pytriton rather than PATH

    @property
    def source(self) -> str:
        return "the nvidia-pytriton wheel" if self.wheel else "PATH"


def find_triton() -> TritonInstall:
    """`tritonserver` on PATH (NVIDIA's image), else the one inside the nvidia-pytriton wheel."""
    on_path = shutil.which("tritonserver")
    if on_path:
        binary = Path(on_path).resolve()
        backends = binary.parent.parent / "backends"
        backend_dir = backends if backends.is_dir() else None
        if backend_dir is None and CONTAINER_BACKENDS.is_dir():
            backend_dir = CONTAINER_BACKENDS
        return TritonInstall(binary, backend_dir)
    install = _wheel_install()
    if install is None:
        raise TritonLaunchError(
            "tritonserver not found: it is neither on PATH (NVIDIA's Triton image) nor in the "
            "nvidia-pytriton wheel. Install it with `pip install nvidia-pytriton==0.7.0` "
            "(or `make install`), or run inside nvcr.io/nvidia/tritonserver:<yy.mm>-py3."
        )
    return install


def _wheel_install() -> TritonInstall | None:
    try:
        import pytriton
    except ImportError:
        return None
    root = Path(pytriton.__file__).resolve().parent
    binary = root / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    libs = root.parent / "nvidia_pytriton.libs"
    return TritonInstall(binary, python_backend_dir(root), (libs,), wheel=True)


def python_backend_dir(pytriton_root: Path) -> Path:
    """A backend directory `<dir>/python/{backend, utils, stub for this Python}` in the cache.

    The wheel ships one stub per Python version; the backend expects it next to
    libtriton_python.so, so we assemble the directory from symlinks once per install.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    source = pytriton_root / "tritonserver"
    stub = source / "python_backend_stubs" / version / STUB
    if not stub.is_file():
        raise TritonLaunchError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub})")
    key = hashlib.sha1(str(source).encode()).hexdigest()[:10]
    backends = specrec_home() / "triton" / f"backends-py{version}-{key}"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    links = {name: source / "backends" / "python" / name for name in PYTHON_BACKEND_FILES}
    links[STUB] = stub
    for name, target in links.items():
        _symlink(python_dir / name, target)
    return backends


def _symlink(link: Path, target: Path) -> None:
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    # Build under a temporary name then rename, so concurrent launchers never see a half-made link.
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)


def libpython_dir() -> Path | None:
    """A directory holding only this interpreter's libpython, or None for a static build.

    The wheel's stub links `libpython3.X.so.1.0`; without this it loads the system's copy
    (another patch release than the running interpreter), which then runs our stdlib.
    """
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not libdir or not soname or not (Path(libdir) / soname).is_file():
        return None
    target = specrec_home() / "triton" / f"libpython-{hashlib.sha1(libdir.encode()).hexdigest()[:10]}"
    target.mkdir(parents=True, exist_ok=True)
    _symlink(target / soname, Path(libdir) / soname)
    return target


def free_port() -> int:
    """A port free right now on all interfaces (Triton binds 0.0.0.0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As Triton binds: a killed server's connections in TIME_WAIT must not block its restart on the same port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return True
    return False


def otlp_http_url(url: str) -> str:
    """Triton's exporter speaks OTLP/HTTP: `host:port` becomes `host:port/v1/traces`."""
    bare = url.split("://", 1)[-1]
    return bare if "/" in bare else f"{bare}/v1/traces"


def trace_args(otlp_url: str | None, rate: int) -> list[str]:
    if not otlp_url:
        return []
    return [
        "--trace-config", "mode=opentelemetry",
        "--trace-config", f"opentelemetry,url={otlp_http_url(otlp_url)}",
        "--trace-config", f"rate={rate}",
        "--trace-config", "level=TIMESTAMPS",
        "--trace-config", "opentelemetry,resource=service.name=specrec-target",
    ]  # fmt: skip


def prepare_repository(source: Path, instances: int | None = None, device: str | None = None,
                       max_sequences: int | None = None, queue_delay_us: int | None = None) -> Path:
    """The repository to serve: `source` itself, or a copy whose config says `instances` x `device`, holds
    `max_sequences` per instance and waits `queue_delay_us` for other sequences' requests to join a forward.

    The source repository stays unchanged, so the same files run in NVIDIA's image.
    """
    source = Path(source)
    if not source.is_dir():
        raise TritonLaunchError(f"model repository {source} does not exist or is not a directory")
    if instances is None and device is None and max_sequences is None and queue_delay_us is None:
        return source
    copy = Path(tempfile.mkdtemp(prefix="specrec-repo-"))
    shutil.copytree(source, copy, dirs_exist_ok=True, symlinks=True)
    for config in copy.glob("*/config.pbtxt"):
        _rewrite_config(config, instances, device, max_sequences, queue_delay_us)
    log.info("serving a copy of %s at %s (instances=%s, device=%s, max_sequences=%s, queue_delay_us=%s)", source,
             copy, instances, device, max_sequences, queue_delay_us)
    return copy


def _rewrite_config(config_path: Path, instances: int | None, device: str | None, max_sequences: int | None,
                    queue_delay_us: int | None = None) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    if instances is not None or device is not None:
        _rewrite_instance_group(config, instances, device)
    if max_sequences is not None:
        # Triton's slots and the model's own cap move together: a slot the model cannot hold state for answers
        # RESOURCE_EXHAUSTED, a model state Triton gives no slot waits in its backlog (config.pbtxt says why).
        config.sequence_batching.oldest.max_candidate_sequences = max_sequences
        if "max_sequences" in config.parameters:
            config.parameters["max_sequences"].string_value = str(max_sequences)
    if queue_delay_us is not None and config.HasField("sequence_batching"):
        config.sequence_batching.oldest.max_queue_delay_microseconds = queue_delay_us
    config_path.write_text(text_format.MessageToString(config))


def _rewrite_instance_group(config, instances: int | None, device: str | None) -> None:  # noqa: ANN001 - ModelConfig
    from tritonclient.grpc import model_config_pb2

    old = config.instance_group[0] if config.instance_group else None
    group = model_config_pb2.ModelInstanceGroup(count=instances or (old.count if old else 1))
    if device and device.startswith("cuda"):
        group.kind = model_config_pb2.ModelInstanceGroup.KIND_GPU
        _, _, index = device.partition(":")
        group.gpus.extend([int(index)] if index else [])
    elif device:
        group.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
    elif old is not None:
        group.kind, group.gpus[:] = old.kind, list(old.gpus)
    del config.instance_group[:]
    config.instance_group.append(group)


class TritonServer:
    """One tritonserver process serving `model_repository`; start() returns once `models` are ready.

    Port 0 means pick a free port. Triton's log is kept (last lines) for error messages,
    and echoed to stderr when `echo_log` is set.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike[str],
        *,
        grpc_port: int = 0,
        http_port: int = 0,
        metrics_port: int = 0,
        models: Sequence[str] = (MODEL_NAME,),
        log_verbose: int = 0,
        trace_otlp_url: str | None = None,
        trace_rate: int = 1,
        extra_args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        shm_default_bytes: int = 16 * MB,
        shm_growth_bytes: int = 16 * MB,
        exit_timeout_s: int = 10,
        echo_log: bool = False,
        install: TritonInstall | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.ports = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
        self.models = tuple(models)
        self.log_verbose = log_verbose
        self.trace_otlp_url = trace_otlp_url
        self.trace_rate = trace_rate
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.shm_default_bytes = shm_default_bytes
        self.shm_growth_bytes = shm_growth_bytes
        self.exit_timeout_s = exit_timeout_s
        self.echo_log = echo_log
        self.install = install
        self.tls = tls or TlsConfig()  # gRPC endpoint only: Triton's HTTP port (probes) stays plaintext
        self.process: subprocess.Popen[bytes] | None = None
        self._log_lines: collections.deque[str] = collections.deque(maxlen=400)
        self._log_thread: threading.Thread | None = None
        self.shm_prefix = ""

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self._log_lines)[-lines:])

    def command(self) -> list[str]:
        """The tritonserver command line (ports must already be chosen)."""
        install = self._install()
        cmd = [str(install.binary), f"--model-repository={self.model_repository}"]
        if install.backend_dir is not None:
            cmd.append(f"--backend-directory={install.backend_dir}")
        cmd += [
            f"--grpc-port={self.ports['grpc']}",
            f"--http-port={self.ports['http']}",
            f"--metrics-port={self.ports['metrics']}",
            f"--log-verbose={self.log_verbose}",
            # An open sequence counts as in-flight: on SIGTERM Triton waits this long for
            # sequences to END, then exits with code 1.
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--backend-config=python,shm-default-byte-size={self.shm_default_bytes}",
            f"--backend-config=python,shm-growth-byte-size={self.shm_growth_bytes}",
            # Several servers on one host (tests, benches) must not share shm region names.
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        cmd += self.tls.triton_server_args()
        return cmd + trace_args(self.trace_otlp_url, self.trace_rate) + self.extra_args

    def child_env(self) -> dict[str, str]:
        """Environment for Triton and its Python stubs: they must import torch and specrec from ours."""
        install = self._install()
        env = dict(os.environ)
        env.update(self.env)
        # The stub resolves `python3` on PATH and honours its pyvenv.cfg, so our venv's
        # site-packages come first (the same trick pytriton uses).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["PYTHONPATH"] = _join_paths([str(REPO_ROOT)], env.get("PYTHONPATH"))
        lib_dirs = [str(d) for d in install.lib_dirs]
        if install.wheel and (own := libpython_dir()) is not None:
            lib_dirs.insert(0, str(own))
        env["LD_LIBRARY_PATH"] = _join_paths(lib_dirs, env.get("LD_LIBRARY_PATH"))
        return env

    def _install(self) -> TritonInstall:
        if self.install is None:
            self.install = find_triton()
        return self.install

    def start(self, timeout: float = 120.0, attempts: int = 2) -> TritonServer:
        """Start Triton and wait until the server and every model in `models` are ready.

        A tritonserver killed by a signal during start-up (seen once on a busy machine: an abort in its
        gRPC event engine) is started again, up to `attempts` times; any other failure is raised at once.
        """
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(timeout)
            except TritonLaunchError:
                code = self.process.poll() if self.process is not None else None
                if attempt == attempts or code is None or code >= 0:
                    raise
                log.warning("tritonserver died with signal %d while starting; retrying", -code)
                self.process = None
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> TritonServer:
        if self.running:
            return self
        if not self.model_repository.is_dir():
            raise TritonLaunchError(f"model repository {self.model_repository} does not exist or is not a directory")
        self._choose_ports()
        self.shm_prefix = f"specrec{os.getpid()}p{self.ports['grpc']}_"
        cmd, env = self.command(), self.child_env()
        log.info("starting Triton: %s", " ".join(cmd))
        # A new session: a Ctrl-C in the terminal reaches us only, and we stop Triton in order.
        self.process = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        self._log_thread = threading.Thread(target=self._pump_log, name="triton-log", daemon=True)
        self._log_thread.start()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("Triton ready: gRPC %s, HTTP %s, metrics %s", self.grpc_url, self.http_url, self.metrics_url)
        return self

    def _choose_ports(self) -> None:
        for name, port in self.ports.items():
            if port == 0:
                self.ports[name] = free_port()
            elif port_in_use(port):
                raise TritonLaunchError(
                    f"{name} port {port} is already in use (another Triton?); choose another "
                    f"with --{name}-port or SPECREC_TARGET_{name.upper()}_PORT, or 0 for any free port"
                )

    def _pump_log(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            self._log_lines.append(line)
            if self.echo_log:
                print(line, file=sys.stderr, flush=True)

    def _wait_ready(self, timeout: float) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout
        # Triton serves TLS only with a certificate; the probe dials the way Triton serves.
        client = grpcclient.InferenceServerClient(self.grpc_url, **(self.tls.triton_kwargs() if self.tls.cert else {}))
        try:
            while time.monotonic() < deadline:
                self._check_alive()
                if self._ready(client):
                    return
                time.sleep(0.2)
        finally:
            client.close()
        raise TritonLaunchError(
            f"Triton did not get {', '.join(self.models)} ready within {timeout:.0f} s. "
            f"Last lines of its log:\n{self.log_tail()}"
        )

    def _check_alive(self) -> None:
        assert self.process is not None
        code = self.process.poll()
        if code is not None:
            if self._log_thread is not None:
                self._log_thread.join(timeout=2)  # so the tail holds Triton's last words
            raise TritonLaunchError(
                f"tritonserver exited with code {code} before it was ready. Last lines of its log:\n"
                f"{self.log_tail()}"
            )
        if any(marker in line for line in self._log_lines for marker in BIND_FAILURES):
            raise TritonLaunchError(f"Triton could not bind its ports {self.ports}:\n{self.log_tail()}")

    def _ready(self, client: grpcclient.InferenceServerClient) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            ready = client.is_server_ready(client_timeout=2.0)
            return bool(ready) and all(client.is_model_ready(m, client_timeout=2.0) for m in self.models)
        except InferenceServerException:
            return False  # not listening yet, or still loading

    def stop(self, grace: float | None = None) -> int | None:
        """SIGTERM, wait `grace` s (default: Triton's exit timeout + 5), then SIGKILL; returns the exit code.

        The code is 1 when sequences were still open at the exit timeout.
        """
        if self.process is None:
            return None
        grace = self.exit_timeout_s + 5.0 if grace is None else grace
        process, self.process = self.process, None
        if process.poll() is None:
            log.info("stopping Triton (pid %d)", process.pid)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("Triton did not stop within %.0f s; killing it", grace)
                _kill_group(process.pid)
                process.wait()
        if self._log_thread is not None:
            self._log_thread.join(timeout=2)
        self._remove_shm()
        return process.returncode

    def _remove_shm(self) -> None:
        # A killed server leaves its Python-backend regions in /dev/shm; a clean exit leaves none.
        shm = Path("/dev/shm")
        if self.shm_prefix and shm.is_dir():
            for region in shm.glob(f"{self.shm_prefix}*"):
                region.unlink(missing_ok=True)

    def send_signal(self, signum: int) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signum)

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn making the child get SIGTERM when we die, even by SIGKILL: no orphaned Triton.

    Linux sends it when the forking *thread* exits, so only from the main thread. prctl is
    looked up here, in the parent: the child between fork and exec should only call it.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _join_paths(first: list[str], rest: str | None) -> str:
    return os.pathsep.join([*first, *([rest] if rest else [])])


def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else default


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="specrec-target",
        description=(
            "Run NVIDIA Triton Inference Server with specrec's model repository (model specrec_target). "
            "Uses `tritonserver` from PATH (NVIDIA's image) or from the nvidia-pytriton wheel, assembles "
            "the Python backend for this interpreter, waits until the model is ready, forwards "
            "SIGINT/SIGTERM to Triton and exits with its code. Arguments after `--` go to tritonserver."
        ),
        epilog=(
            "Environment: SPECREC_TARGET_GRPC_PORT, SPECREC_TARGET_HTTP_PORT, SPECREC_TARGET_METRICS_PORT, "
            "SPECREC_ARTIFACTS (trained model dir, given to the model as SPECREC_TARGET_MODEL_DIR), "
            "SPECREC_DEVICE, SPECREC_TARGET_DTYPE (float32, or bfloat16 with a batch-invariant forward), "
            "SPECREC_TARGET_INSTANCES, SPECREC_TARGET_MAX_SEQUENCES, SPECREC_TARGET_TRACE_URL, "
            "SPECREC_TLS_CERT, SPECREC_TLS_KEY, SPECREC_TLS_CA, SPECREC_TLS_CLIENT_AUTH."
        ),
    )
    env = os.environ.get
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY,
                        help="Triton model repository (default: %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=_env_int("SPECREC_TARGET_GRPC_PORT", 8001),
                        help="KServe v2 gRPC port; 0 = any free port (default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=_env_int("SPECREC_TARGET_HTTP_PORT", 8000),
                        help="HTTP port (default: %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=_env_int("SPECREC_TARGET_METRICS_PORT", 8002),
                        help="Prometheus metrics port (default: %(default)s)")
    parser.add_argument("--artifacts", default=env("SPECREC_ARTIFACTS"),
                        help="directory of the trained target model; passed as SPECREC_TARGET_MODEL_DIR")
    parser.add_argument("--device", default=env("SPECREC_DEVICE"),
                        help="cpu | cuda | cuda:N; rewrites instance_group kind in a copy of the repository")
    parser.add_argument("--instances", type=int, default=_env_int("SPECREC_TARGET_INSTANCES", None),
                        help="model instances (processes); rewrites instance_group count in a copy")
    parser.add_argument("--trace-url", default=env("SPECREC_TARGET_TRACE_URL"),
                        help="OTLP/HTTP collector (host:4318 or host:4318/v1/traces) for Triton's OpenTelemetry traces")
    parser.add_argument("--trace-rate", type=int, default=_env_int("SPECREC_TARGET_TRACE_RATE", 1),
                        help="Triton traces one request in N of those arriving without a trace context; requests "
                             "that carry a traceparent are traced whatever N (env SPECREC_TARGET_TRACE_RATE; "
                             "default: %(default)s)")
    parser.add_argument("--log-verbose", type=int, default=0, help="Triton --log-verbose level")
    parser.add_argument("--max-sequences", type=int, default=_env_int("SPECREC_TARGET_MAX_SEQUENCES", None),
                        help="sequences one instance holds at once (Triton's max_candidate_sequences and the model's "
                             "max_sequences, rewritten together in a copy; env SPECREC_TARGET_MAX_SEQUENCES)")
    parser.add_argument("--queue-delay-us", type=int, default=_env_int("SPECREC_TARGET_QUEUE_DELAY_US", None),
                        help="how long the sequence batcher waits for other sequences' requests to join a forward "
                             "(config.pbtxt: 500 us); a sequence running alone pays it every round (rewritten in a "
                             "copy; env SPECREC_TARGET_QUEUE_DELAY_US)")
    parser.add_argument("--shm-mb", type=int, default=16,
                        help="Python backend shared memory per instance, MB (default: 16)")
    parser.add_argument("--shm-growth-mb", type=int, default=None,
                        help="step by which that region grows, MB (default: --shm-mb)")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for READY")
    parser.add_argument("--exit-timeout", type=int, default=30,
                        help="on SIGTERM, seconds Triton waits for open sequences to end (default: 30)")
    parser.add_argument("extra", nargs="*", help="extra tritonserver arguments (after --)")
    add_tls_args(parser)  # --grpc-use-ssl[-mutual] on Triton's gRPC port; the readiness probe dials with it
    args = parser.parse_args(argv)
    try:
        args.tls = tls_from_args(args)
    except SecurityConfigError as err:
        parser.error(str(err))
    return args  # fmt: skip


def server_from_args(args: argparse.Namespace) -> TritonServer:
    env = {}
    if args.artifacts:
        artifacts = Path(args.artifacts).expanduser().resolve()
        if not artifacts.is_dir():
            raise TritonLaunchError(f"--artifacts / SPECREC_ARTIFACTS: {artifacts} is not a directory")
        env["SPECREC_TARGET_MODEL_DIR"] = str(artifacts)
    if args.device:
        env["SPECREC_DEVICE"] = args.device
    if args.queue_delay_us is not None and args.queue_delay_us < 0:
        raise TritonLaunchError(f"--queue-delay-us must be >= 0, got {args.queue_delay_us}")
    repository = prepare_repository(args.model_repository, args.instances, args.device, args.max_sequences,
                                    args.queue_delay_us)
    return TritonServer(
        repository,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        log_verbose=args.log_verbose,
        trace_otlp_url=args.trace_url,
        trace_rate=args.trace_rate,
        extra_args=args.extra,
        env=env,
        shm_default_bytes=args.shm_mb * MB,
        shm_growth_bytes=(args.shm_growth_mb or args.shm_mb) * MB,
        exit_timeout_s=args.exit_timeout,
        echo_log=True,
        tls=args.tls,
    )


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        server = server_from_args(args)
    except TritonLaunchError as exc:
        log.error("%s", exc)
        return 2
    try:
        return _serve(server, args.startup_timeout)
    finally:
        if server.model_repository != args.model_repository.resolve():
            shutil.rmtree(server.model_repository, ignore_errors=True)  # our rewritten copy


def _serve(server: TritonServer, startup_timeout: float) -> int:
    """Start, then block until Triton exits; SIGINT/SIGTERM make it drain and exit."""
    stop_requested = _forward_signals(server)
    try:
        server.install = find_triton()
        log.info("tritonserver from %s: %s", server.install.source, server.install.binary)
        server.start(timeout=startup_timeout)
    except TritonLaunchError as exc:
        if stop_requested.is_set():  # Triton exited because we forwarded the signal
            log.info("stopped before Triton was ready")
            return 130
        log.error("%s", exc)
        return 2
    if stop_requested.is_set():  # the signal came before Triton's process existed
        server.send_signal(signal.SIGTERM)
    watch = _watch_stubs(server, stop_requested)
    code = server.wait()
    watch.stop()
    server.stop()
    log.info("Triton exited with code %d", code)
    return code


def _watch_stubs(server: TritonServer, stopping: threading.Event) -> StubWatch:
    """A dead Python stub leaves Triton READY but failing every request: kill it, so we exit and get restarted."""
    assert server.process is not None
    pid = server.process.pid

    def lost(reason: str) -> None:
        if stopping.is_set():  # a draining Triton unloads the model: its stubs exit on purpose
            return
        log.error("%s; Triton cannot serve specrec_target any more (it does not restart stubs): killing it", reason)
        _kill_group(pid)

    watch = StubWatch(server.shm_prefix, lost, server_pid=pid)
    watch.start()
    return watch


def _forward_signals(server: TritonServer) -> threading.Event:
    """SIGINT/SIGTERM ask Triton to drain and exit (it runs in its own session, so we must)."""
    requested = threading.Event()

    def forward(signum: int, _frame: object) -> None:
        log.info("received %s; stopping Triton", signal.Signals(signum).name)
        requested.set()
        server.send_signal(signal.SIGTERM)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    return requested


if __name__ == "__main__":
    sys.exit(main())
