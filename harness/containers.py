"""Build specrec's container images and run a private Docker daemon for them (`make images`, tests/test_images.py).

The images install from a wheelhouse staged on this machine (`pip wheel`), so a build needs no network and gets
exactly the dependency versions this machine resolved; their base is a build argument (the public python image by
default, or a Debian base made here with debootstrap where no image registry is reachable).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("specrec.containers")

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build"
TORCH = "torch==2.13.0"  # the Makefile's pin; a looser one pulls the multi-GB CUDA build
TAG = "0.1.0"  # the chart's appVersion
SERVICES = ("orchestrator", "draft", "target")
PUBLIC_BASE = "python:3.11-slim-bookworm"
LOCAL_BASE = "specrec-local/python:3.11-bookworm"
# What the services read from an artifacts directory (training by-products stay out of the images).
ARTIFACT_PARTS = ("semantic_ids", "target", "drafter", "retrieval")
# Every image we build carries this label, so the images a rebuild leaves untagged can be pruned without touching
# anything else on a user's daemon.
BUILD_LABEL = "org.specrec.build=1"


class ContainerError(RuntimeError):
    """A build or daemon step failed; the message says which and how to look."""


def docker_cli() -> str:
    """Debian's docker.io CLI (matches its daemon and does BuildKit) before any other `docker` on PATH."""
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ContainerError("no docker CLI: install Debian's docker.io package (apt-get install docker.io)")


def run(cmd: Sequence[str], *, env: dict[str, str] | None = None, quiet: bool = False,
        timeout: float | None = None) -> str:
    """Run a command; on failure raise with its last output lines (the part a person needs)."""
    log.info("$ %s", " ".join(cmd))
    proc = subprocess.run(list(cmd), env=env, capture_output=True, timeout=timeout)
    out = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join((out + proc.stderr.decode(errors="replace")).strip().splitlines()[-25:])
        raise ContainerError(f"{cmd[0]} {' '.join(cmd[1:3])} ... failed ({proc.returncode}):\n{tail}")
    if not quiet and out.strip():
        log.debug("%s", out.strip())
    return out


@dataclass
class Dockerd:
    """A private dockerd: its own data root, socket and pid file; no iptables rules, no docker0 bridge.

    --iptables=false and --bridge=none leave the host's firewall alone (stopping a normal dockerd leaves its
    rules, FORWARD policy DROP and docker0 behind). Builds run with --network none (the wheelhouse is local);
    containers talk over a user-defined bridge and publish ports on 127.0.0.1 through docker-proxy.
    """

    root: Path
    process: subprocess.Popen[bytes] | None = None
    external: bool = False  # a daemon the user already runs (DOCKER_HOST or the default socket)

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ) if self.external else {**os.environ, "DOCKER_HOST": f"unix://{self.socket}"}

    def start(self, timeout: float = 30.0) -> Dockerd:
        dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
        if not os.access(dockerd, os.X_OK):
            raise ContainerError("no dockerd: install Debian's docker.io package (apt-get install docker.io)")
        self.root.mkdir(parents=True, exist_ok=True)
        self._clear_stale_pidfile()
        logfile = open(self.root / "dockerd.log", "ab")  # noqa: SIM115 - lives as long as the daemon
        self.process = subprocess.Popen(
            [dockerd, "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
             "--pidfile", str(self.root / "dockerd.pid"), "-H", f"unix://{self.socket}",
             "--iptables=false", "--ip-masq=false", "--bridge=none"],
            stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ContainerError(f"dockerd exited ({self.process.returncode}); see {self.root / 'dockerd.log'}")
            probe = subprocess.run([docker_cli(), "version"], env=self.env, capture_output=True)
            if probe.returncode == 0:
                return self
            time.sleep(0.3)
        self.stop()
        raise ContainerError(f"dockerd not ready in {timeout:.0f} s; see {self.root / 'dockerd.log'}")

    def _clear_stale_pidfile(self) -> None:
        """A daemon killed with its test run leaves its pid file, and dockerd refuses to start over it."""
        pidfile = self.root / "dockerd.pid"
        if not pidfile.is_file():
            return
        pid = int(pidfile.read_text().strip() or 0)
        if pid and Path(f"/proc/{pid}").exists() and b"dockerd" in Path(f"/proc/{pid}/cmdline").read_bytes():
            raise ContainerError(f"a dockerd (pid {pid}) already runs on {self.root}: stop it (kill {pid}) or use "
                                 f"it (DOCKER_HOST=unix://{self.socket})")
        pidfile.unlink()

    def docker(self, *args: str, **kwargs) -> str:
        return run([docker_cli(), *args], env=self.env, **kwargs)

    def stop(self) -> None:
        """Stop the daemon by its pid, then unmount what it leaves mounted under its root."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
        # dockerd re-mounts its data root privately and leaves netns (nsfs) mounts under its exec root.
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(self.root))]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)


def users_daemon() -> Dockerd | None:
    """The daemon `docker` reaches as things are (DOCKER_HOST or /var/run/docker.sock), if one answers."""
    try:
        cli = docker_cli()
    except ContainerError:
        return None
    if subprocess.run([cli, "version"], capture_output=True, timeout=20).returncode != 0:
        return None
    return Dockerd(Path(os.environ.get("DOCKER_HOST", "/var/run/docker.sock")), external=True)


@contextlib.contextmanager
def running_dockerd(root: Path | None = None) -> Iterator[Dockerd]:
    """A private daemon for the length of a `with` block; its images persist in root/data between runs."""
    daemon = Dockerd(root or default_root()).start()
    try:
        yield daemon
    finally:
        daemon.stop()


def default_root() -> Path:
    return Path(os.environ.get("SPECREC_DOCKER_ROOT", Path.home() / ".cache" / "specrec" / "docker"))


def image_exists(daemon: Dockerd, ref: str) -> bool:
    return subprocess.run([docker_cli(), "image", "inspect", ref], env=daemon.env,
                          capture_output=True).returncode == 0


def ensure_local_base(daemon: Dockerd, ref: str = LOCAL_BASE) -> str:
    """A Debian bookworm base with python3.11, venv and libpython (Triton's Python stub links it), made with
    debootstrap: no image registry needed."""
    if image_exists(daemon, ref):
        return ref
    if shutil.which("debootstrap") is None:
        raise ContainerError("no debootstrap: install it (apt-get install debootstrap), or pass --base-image "
                             f"{PUBLIC_BASE} where a registry is reachable")
    rootfs = daemon.root / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    log.info("making base image %s with debootstrap (about a minute)", ref)
    run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,libpython3.11,ca-certificates",
         "bookworm", str(rootfs), "http://deb.debian.org/debian"], quiet=True, timeout=900)
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        shutil.rmtree(rootfs / cache, ignore_errors=True)
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run([docker_cli(), "import", "--change", 'CMD ["/bin/bash"]', "-", ref],
                              stdin=tar.stdout, env=daemon.env, capture_output=True)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)
    if imported.returncode != 0:
        raise ContainerError(f"docker import failed: {imported.stderr.decode(errors='replace')}")
    return ref


def stage_wheels(python: str = sys.executable) -> Path:
    """Wheels of specrec and every runtime dependency into build/wheels, at the versions installed here (the ones
    `make test` checked), so the images run what the tests ran."""
    wheels = BUILD / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for old in wheels.glob("specrec-*.whl"):  # always rebuilt: the source changes, its version does not
        old.unlink()
    constraints = BUILD / "constraints.txt"
    constraints.write_text(run([python, "-m", "pip", "freeze", "--exclude-editable"], quiet=True))
    run([python, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), "-c", str(constraints), TORCH, str(REPO)],
        quiet=True, timeout=1800)
    return wheels


def stage_artifacts(artifacts: Path) -> Path:
    """Copy the parts of a trained artifacts directory the services read into build/artifacts."""
    staged = BUILD / "artifacts"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    for part in ARTIFACT_PARTS:
        if (artifacts / part).is_dir():
            shutil.copytree(artifacts / part, staged / part)
    # The services run as uid 10001: files written 0600 by training must be readable in the image.
    for path in staged.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    missing = [p for p in ("semantic_ids", "target") if not (staged / p).is_dir()]
    if missing:
        raise ContainerError(f"{artifacts} has no {', '.join(missing)}/: train first (specrec train-target)")
    return staged


def build_images(daemon: Dockerd, base_image: str, tag: str = TAG) -> dict[str, str]:
    """specrec/base from the wheelhouse, then one thin image per service; returns service -> image."""
    common = ["build", "--network", "none", "--label", BUILD_LABEL]
    base = f"specrec/base:{tag}"
    daemon.docker(*common, "--build-arg", f"BASE_IMAGE={base_image}", "-f", str(REPO / "docker/base.Dockerfile"),
                  "-t", base, str(REPO), quiet=True, timeout=1800)
    images = {}
    for service in SERVICES:
        ref = f"specrec/{service}:{tag}"
        daemon.docker(*common, "--build-arg", f"SPECREC_BASE={base}",
                      "-f", str(REPO / f"docker/{service}.Dockerfile"), "-t", ref, str(REPO), quiet=True,
                      timeout=600)
        images[service] = ref
    prune_replaced_images(daemon)
    return images


def prune_replaced_images(daemon: Dockerd) -> None:
    """Remove the images of ours a rebuild left untagged: each rebuild of the four leaves ~2.4 GB behind."""
    daemon.docker("image", "prune", "--force", "--filter", f"label={BUILD_LABEL}", quiet=True)


def default_artifacts() -> Path:
    home = Path(os.environ.get("SPECREC_HOME", Path.home() / ".cache" / "specrec"))
    return home / "artifacts" / "ml-100k" / "tiny"


def make_images(artifacts: Path, base_image: str | None, daemon: Dockerd) -> dict[str, str]:
    """Everything `make images` does, on a running daemon."""
    t0 = time.monotonic()
    stage_artifacts(artifacts)
    stage_wheels()
    base = base_image or ensure_local_base(daemon)
    images = build_images(daemon, base)
    log.info("built %s in %.0f s", ", ".join(images.values()), time.monotonic() - t0)
    return images


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.containers",
        description="Build specrec/{base,orchestrator,draft,target} images, with the docker daemon that answers or "
                    "else a private dockerd (root needed). "
                    "Dependencies come from a wheelhouse staged here with pip (build/wheels), so builds run "
                    "without network; the trained artifacts are baked in (build/artifacts).")
    parser.add_argument("--artifacts", type=Path, default=default_artifacts(),
                        help="trained artifacts directory to bake in (default: the tiny profile, %(default)s)")
    parser.add_argument("--base-image", default=os.environ.get("SPECREC_BASE_IMAGE"),
                        help=f"base image with python3.11 (e.g. {PUBLIC_BASE} where a registry is reachable); "
                             f"default: {LOCAL_BASE}, made here with debootstrap (env SPECREC_BASE_IMAGE)")
    parser.add_argument("--private-daemon", action="store_true",
                        help="start a private dockerd even if a daemon answers (one is started anyway when none does)")
    parser.add_argument("--docker-root", type=Path, default=default_root(),
                        help="data root of the private dockerd; its images persist there (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not args.artifacts.is_dir():
        parser.error(f"--artifacts {args.artifacts} does not exist: `make run` trains the tiny profile first")
    try:
        daemon = None if args.private_daemon else users_daemon()
        if daemon is not None:
            images = make_images(args.artifacts, args.base_image, daemon)
            where = "your docker daemon"
        else:
            with running_dockerd(args.docker_root) as daemon:
                images = make_images(args.artifacts, args.base_image, daemon)
            where = f"the private daemon's data root {args.docker_root} (DOCKER_HOST=unix://{daemon.socket})"
    except ContainerError as err:
        log.error("%s", err)
        return 1
    print("images:", " ".join(images.values()), "in", where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
