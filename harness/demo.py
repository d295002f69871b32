"""The newcomer's demo (`make run`): train if needed, bring up the whole stack on loopback, show it working."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from specrec.cli import add_common_args, recommend_for_user, run_command

log = logging.getLogger("specrec")


def cmd_demo(args: argparse.Namespace) -> int:
    """make run: train what is missing, start the three services, show requests, stay up until Ctrl-C."""
    import signal
    import threading

    from harness.stack import LocalStack, StackConfig
    from specrec.pipeline import prepare
    from specrec.training.drafter import train_drafter, trained

    arts = prepare(args.dataset, args.profile, seed=args.seed)
    if not trained(arts):
        log.info("training the drafter (once; cached in %s)", arts.directory)
        train_drafter(arts)
    config = StackConfig(artifacts=arts.directory, drafter=args.drafter, policy=args.policy,
                         target_grpc=args.target_port, draft_port=args.draft_port,
                         orchestrator_port=args.port, threads=args.threads, metrics_port=args.metrics_port,
                         draft_metrics_port=args.draft_metrics_port, target_metrics_port=args.target_metrics_port)
    log.info("starting Triton, the draft service and the orchestrator (logs in %s)", LocalStack(config).log_dir)
    with LocalStack(config) as stack:
        print(f"\nspecrec is up: orchestrator {stack.orchestrator_addr}, drafter {stack.draft_addr}, "
              f"Triton {stack.target_addr}")
        for name, url in stack.metrics_urls().items():
            print(f"  {name} metrics: {url}")
        print()
        for user in args.users.split(","):
            recommend_for_user(arts, stack.orchestrator_addr, user.strip(), args.n)
            print()
        if args.no_wait:
            return 0
        print(f"Try: specrec recommend --profile {arts.profile.name} --user 7 --addr {stack.orchestrator_addr}")
        print("Ctrl-C stops all three services.")
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()
        print("stopping...")
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
    p.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
