"""The newcomer's demo (`make run`): train if needed, bring up the whole stack on loopback, show it working."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from specrec.cli import add_common_args, recommend_for_user, retrieve_for_user, run_command

log = logging.getLogger("specrec")


QUICK_PROFILE = "tiny"  # trains in about a minute: the first lists a newcomer sees while the real model trains


def ready(arts) -> bool:
    from specrec.training.drafter import trained

    return (arts.target_dir / "config.json").is_file() and trained(arts)


def prepared(args: argparse.Namespace, profile: str):
    """The profile's artifacts, trained if missing (target, then the drafter)."""
    from specrec.pipeline import prepare
    from specrec.training.drafter import train_drafter, trained

    arts = prepare(args.dataset, profile, seed=args.seed)
    if not trained(arts):
        log.info("training the %s drafter (once; cached in %s)", profile, arts.directory)
        train_drafter(arts)
    return arts


def cmd_demo(args: argparse.Namespace) -> int:
    """make run: train what is missing, start the three services, show requests, stay up until Ctrl-C.

    When the asked profile is not trained yet (a first run: ~10+ minutes), the quick profile is trained (about a
    minute) and served first, while the asked one trains in a background process; its stack replaces the quick
    one when it is ready."""
    import threading

    from specrec.pipeline import prepare

    stop = threading.Event()  # Ctrl-C / SIGTERM while the services are up
    if args.profile != QUICK_PROFILE and not ready(prepare(args.dataset, args.profile, seed=args.seed, train=False)):
        # first, alone on the cores, and only the target (plain decoding, no drafter to train): the sooner a
        # newcomer sees a list
        quick = prepare(args.dataset, QUICK_PROFILE, seed=args.seed)
        training = BackgroundTraining(args)
        try:
            serve(args, quick, stop, training, plain=True,
                  note=f"a quick {QUICK_PROFILE} target, plain decoding, until the {args.profile} models are trained")
        finally:
            training.stop()  # stopped first: its checkpoints let the next make run go on from there
        if stop.is_set() or args.no_wait:
            return 0
        if training.returncode != 0:
            log.error("training the %s profile failed (exit %s): see %s", args.profile, training.returncode,
                      training.log_path)
            return 1
    serve(args, prepared(args, args.profile), stop)
    return 0


class BackgroundTraining:
    """`specrec-demo --train-only` for the asked profile in its own process, its progress in a log file."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"specrec-train-{args.profile}-{os.getpid()}.log"

    def start(self) -> None:
        a = self.args
        cmd = [sys.executable, "-m", "harness.demo", "--train-only", "--dataset", a.dataset, "--profile", a.profile,
               "--seed", str(a.seed)]
        with open(self.log_path, "wb") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        print(f"Training the {a.profile} profile in the background (pid {self.proc.pid}, progress in "
              f"{self.log_path}); its services replace these when it is ready.", flush=True)

    def finished(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


def serve(args: argparse.Namespace, arts, stop, training: BackgroundTraining | None = None, note: str = "",
          plain: bool = False) -> None:
    """Start the stack on `arts`, show the sample users' lists, then wait for `stop`. With `training`: start it
    once the lists are out (the cores were the first list's until then) and return when it ends. `plain`: no
    drafter, policy off."""
    import signal

    from harness.stack import LocalStack, StackConfig

    config = StackConfig(artifacts=arts.directory, drafter=args.drafter, policy="off" if plain else args.policy,
                         with_drafter=not plain,
                         target_grpc=args.target_port, draft_port=args.draft_port,
                         orchestrator_port=args.port, threads=args.threads, metrics_port=args.metrics_port,
                         draft_metrics_port=args.draft_metrics_port, target_metrics_port=args.target_metrics_port)
    log.info("starting Triton, the draft service and the orchestrator (logs in %s)", LocalStack(config).log_dir)
    with LocalStack(config) as stack:
        print(f"\nspecrec is up ({arts.profile.name} profile{': ' + note if note else ''}): orchestrator "
              f"{stack.orchestrator_addr}, drafter {stack.draft_addr or 'none'}, Triton {stack.target_addr}",
              flush=True)
        for name, url in stack.metrics_urls().items():
            print(f"  {name} metrics: {url}")
        print(flush=True)
        for user in args.users.split(","):
            recommend_for_user(arts, stack.orchestrator_addr, user.strip(), args.n)
            print(flush=True)
        retrieve_for_user(arts, stack.orchestrator_addr, args.users.split(",")[0].strip(), args.n, plain=plain)
        print(flush=True)
        if args.no_wait:
            return
        print(f"Try: specrec recommend --profile {arts.profile.name} --user 7 --addr {stack.orchestrator_addr}")
        print(f"     specrec retrieve --profile {arts.profile.name} --user 7 --k 20 --addr {stack.orchestrator_addr}")
        print("Ctrl-C stops all three services.", flush=True)
        if training is not None:
            training.start()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):
                if training is not None and training.finished():
                    print(f"the {args.profile} model is ready: restarting the services with it"
                          if training.returncode == 0 else f"training the {args.profile} model failed", flush=True)
                    return
            print("stopping...")
        finally:  # training or loading after this is interruptible again
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def cmd_train_only(args: argparse.Namespace) -> int:
    prepared(args, args.profile)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specrec-demo", description=__doc__)
    add_common_args(p)
    p.add_argument("--users", default="42,7,100", help="comma-separated users to recommend for")
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--drafter", default="model", help="model | retrieval | hybrid")
    p.add_argument("--policy", default="adaptive")
    p.add_argument("--port", type=int, default=int(os.environ.get("SPECREC_ORCHESTRATOR_PORT", "50051")))
    p.add_argument("--draft-port", type=int, default=int(os.environ.get("SPECREC_DRAFT_PORT", "50052")))
    p.add_argument("--target-port", type=int, default=int(os.environ.get("SPECREC_TARGET_GRPC_PORT", "8001")))
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("SPECREC_METRICS_PORT", "9100")),
                   help="the orchestrator's /metrics port, 0 = off")
    p.add_argument("--draft-metrics-port", type=int,
                   default=int(os.environ.get("SPECREC_DRAFT_METRICS_PORT", "9101")),
                   help="the draft service's /metrics port, 0 = off")
    p.add_argument("--target-metrics-port", type=int,
                   default=int(os.environ.get("SPECREC_TARGET_METRICS_PORT", "8002")), help="Triton's /metrics port")
    p.add_argument("--threads", type=int, default=1, help="torch threads per service")
    p.add_argument("--no-wait", action="store_true", help="stop after the sample requests")
    p.add_argument("--train-only", action="store_true", help="train the profile's target and drafter, then exit "
                   "(what the demo runs in the background on a first run)")
    p.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if "--train-only" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(func=cmd_train_only)
    return run_command(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
