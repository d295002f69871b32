"""Round time to Triton on loopback: unary ModelInfer vs the ModelStreamInfer bidi stream, echo model."""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as grpcclient

from specrec.target_client import OUTPUTS, TargetClient
from target_service.launch import DEFAULT_REPOSITORY, MODEL_NAME, TritonServer

ROOT = Path(__file__).resolve().parents[1]
ECHO_MODEL = ROOT / "tests" / "fixtures" / "echo_repository" / MODEL_NAME / "1" / "model.py"
CONTEXT = np.arange(120, dtype=np.int64)  # a typical history: ~20 items x 6 tokens


def echo_repository(root: Path, queue_delay_us: int | None = None) -> Path:
    """The real config.pbtxt next to the echo model.py, so the transport is the real one.

    `queue_delay_us` replaces the batcher's max_queue_delay_microseconds, which a lone
    sequence pays every round.
    """
    model = root / MODEL_NAME
    (model / "1").mkdir(parents=True)
    config = (DEFAULT_REPOSITORY / MODEL_NAME / "config.pbtxt").read_text()
    if queue_delay_us is not None:
        config = re.sub(r"max_queue_delay_microseconds: \d+", f"max_queue_delay_microseconds: {queue_delay_us}", config)
    (model / "config.pbtxt").write_text(config)
    shutil.copy(ECHO_MODEL, model / "1" / "model.py")
    return root


def tree(n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """A chain of n_nodes tokens (parents -1, 0, 1, ...): the echo model accepts all of it."""
    return np.arange(n_nodes, dtype=np.int64) + 7, np.arange(n_nodes, dtype=np.int64) - 1


def request(seq_id: int, tokens: np.ndarray, parents: np.ndarray, *, start: bool = False) -> dict:
    """One ModelInfer request as the keyword arguments tritonclient takes (unary and stream alike)."""
    arrays = {"TREE_TOKENS": tokens, "TREE_PARENTS": parents}
    if start:
        arrays["CONTEXT"] = CONTEXT
    inputs = []
    for name, values in arrays.items():
        tensor = grpcclient.InferInput(name, [1, len(values)], "INT64")
        tensor.set_data_from_numpy(values.reshape(1, -1))
        inputs.append(tensor)
    return {
        "model_name": MODEL_NAME,
        "inputs": inputs,
        "outputs": [grpcclient.InferRequestedOutput(name) for name in OUTPUTS],
        "sequence_id": seq_id,
        "sequence_start": start,
        "parameters": {"mode": "greedy", "temperature": "1.0", "seed": 0},
    }


async def time_rounds(rounds: int, warmup: int, one_round: Callable[[], Awaitable[None]]) -> list[float]:
    """Milliseconds per round, warm-up rounds excluded."""
    times = []
    for i in range(warmup + rounds):
        t0 = time.perf_counter()
        await one_round()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


async def bench_unary(url: str, seq_id: int, n_nodes: int, rounds: int, warmup: int) -> list[float]:
    tokens, parents = tree(n_nodes)
    async with grpcclient.InferenceServerClient(url) as client:
        await client.infer(**request(seq_id, tokens, parents, start=True))

        async def one_round() -> None:
            await client.infer(**request(seq_id, tokens, parents))

        times = await time_rounds(rounds, warmup, one_round)
        await client.infer(**{**request(seq_id, tokens[:0], parents[:0]), "sequence_end": True})
    return times


async def bench_stream(url: str, seq_id: int, n_nodes: int, rounds: int, warmup: int) -> list[float]:
    tokens, parents = tree(n_nodes)
    queue: asyncio.Queue[dict | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[dict]:
        while (item := await queue.get()) is not None:
            yield item

    async with grpcclient.InferenceServerClient(url) as client:
        responses = client.stream_infer(requests())

        async def send(item: dict) -> None:
            await queue.put(item)
            _, error = await anext(responses)
            if error is not None:
                raise error

        await send(request(seq_id, tokens, parents, start=True))
        times = await time_rounds(rounds, warmup, lambda: send(request(seq_id, tokens, parents)))
        await send({**request(seq_id, tokens[:0], parents[:0]), "sequence_end": True})
        await queue.put(None)
    return times


async def bench_client(url: str, seq_id: int, n_nodes: int, rounds: int, warmup: int) -> list[float]:
    """specrec.target_client.TargetClient.verify: the transport the orchestrator uses."""
    tokens, parents = tree(n_nodes)
    async with TargetClient(url) as client:
        await client.verify(seq_id, tokens, parents, context=CONTEXT, start=True)

        async def one_round() -> None:
            await client.verify(seq_id, tokens, parents)

        times = await time_rounds(rounds, warmup, one_round)
        await client.end(seq_id)
    return times


def summary(times: list[float]) -> tuple[float, float, float]:
    deciles = statistics.quantiles(times, n=10)
    return statistics.fmean(times), statistics.median(times), deciles[8]


def report(results: dict[str, list[float]], rounds: int, n_nodes: int) -> str:
    lines = [
        f"Triton round time on loopback, echo model, {n_nodes}-node tree, {rounds} rounds (ms)",
        f"{'':8}" + "".join(f"{name:>12}" for name in results),
    ]
    stats = {name: summary(times) for name, times in results.items()}
    for i, label in enumerate(("mean", "p50", "p90")):
        lines.append(f"{label:8}" + "".join(f"{stats[name][i]:12.3f}" for name in results))
    return "\n".join(lines)


async def run(url: str, n_nodes: int, rounds: int, warmup: int) -> dict[str, list[float]]:
    # Interleave the transports in blocks so drift (CPU frequency, other load) hits all alike.
    results: dict[str, list[float]] = {"unary": [], "stream": [], "client": []}
    benches = {"unary": bench_unary, "stream": bench_stream, "client": bench_client}
    blocks = 5
    for block in range(blocks):
        for i, (name, bench) in enumerate(benches.items()):
            seq_id = 1 + block * len(benches) + i
            results[name] += await bench(url, seq_id, n_nodes, rounds // blocks, warmup)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=1000, help="timed rounds per transport")
    parser.add_argument("--warmup", type=int, default=50, help="untimed rounds before each block")
    parser.add_argument("--nodes", type=int, default=16, help="tree size")
    parser.add_argument("--queue-delay-us", type=int, help="override the config's max_queue_delay_microseconds")
    parser.add_argument("--url", help="an already running Triton serving an echo specrec_target")
    args = parser.parse_args()
    if args.url:
        print(report(asyncio.run(run(args.url, args.nodes, args.rounds, args.warmup)), args.rounds, args.nodes))
        return
    with tempfile.TemporaryDirectory(prefix="specrec-echo-") as tmp:
        repository = echo_repository(Path(tmp), args.queue_delay_us)
        with TritonServer(repository) as server:
            results = asyncio.run(run(server.grpc_url, args.nodes, args.rounds, args.warmup))
    print(report(results, args.rounds, args.nodes))


if __name__ == "__main__":
    main()
