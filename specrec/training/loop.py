"""A seeded, resumable training loop with a progress bar, shared by the target and the drafter."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

CHECKPOINT = "train_state.pt"


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: torch.nn.Module, loss_fn: Callable[[np.random.Generator], torch.Tensor], steps: int, lr: float,
          work_dir: Path, seed: int = 0, desc: str = "train", save_every: int = 200, clip: float = 1.0,
          progress: bool = True) -> list[float]:
    """Minimise loss_fn(rng) for `steps` AdamW steps; resumes from work_dir/train_state.pt if present."""
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt = work_dir / CHECKPOINT
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    start, losses = 0, []
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        start, losses = state["step"], state["losses"]
    model.train()
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, disable=not progress, unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=max(1, steps // 20))
        loss = loss_fn(rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if (step + 1) % save_every == 0 and step + 1 < steps:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng.bit_generator.state,
                        "torch_rng": torch.get_rng_state(), "step": step + 1, "losses": losses}, ckpt)
    model.eval()
    ckpt.unlink(missing_ok=True)
    return losses
