"""Batched constrained decoding with our forward: greedy (the reference output) or seeded sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specrec.decoding.select import constrained_argmax, constrained_logprob, constrained_probs, sample
from specrec.models.llama import Transformer
from specrec.models.steps import Block, build_step
from specrec.semantic_ids.constraint import ListConstraint, ListState


@dataclass
class Decoded:
    tokens: list[int]  # generated tokens after REC, ending with EOS
    items: list[int]  # the recommended item indices
    model_steps: int  # forwards this row took part in
    logprobs: list[float]  # per token: log P under the constrained distribution at T = 1 (forced tokens: 0)


def take_forced(constraint: ListConstraint, state: ListState, out: list[int]) -> tuple[ListState, list[int]]:
    """Append tokens the grammar forces (jump-forward); returns the state and the tokens appended."""
    appended = []
    while not state.finished and (tok := constraint.forced(state)) is not None:
        nxt = constraint.advance(state, tok)
        assert nxt is not None
        state = nxt
        out.append(tok)
        appended.append(tok)
    return state, appended


@torch.inference_mode()
def decode(model: Transformer, constraint: ListConstraint, prompts: list[list[int]], temperature: float = 0.0,
           seed: int = 0, jump_forward: bool = True, max_len: int | None = None) -> list[Decoded]:
    """Generate a list for every prompt (`BOS items REC`). temperature 0 = greedy."""
    device = next(model.parameters()).device
    per_row = max(len(p) for p in prompts) + (constraint.n_items * (constraint.trie.depth + 1) + 2)
    cache = model.new_cache(len(prompts), max_len or per_row)
    gens = [torch.Generator().manual_seed(seed + r) for r in range(len(prompts))]
    states, outs, pending, steps = [], [], [], [0] * len(prompts)
    logprobs: list[list[float]] = []
    for prompt in prompts:
        out: list[int] = []
        state = constraint.start(prompt)
        if jump_forward:
            state, forced = take_forced(constraint, state, out)
        else:
            forced = []
        states.append(state)
        outs.append(out)
        logprobs.append([0.0] * len(out))
        pending.append(list(prompt) + forced)
    active = [r for r in range(len(prompts)) if not states[r].finished]
    while active:
        step = build_step(cache, [Block.chain(r, pending[r]) for r in active], device)
        logits = model(step.tokens, step.positions, cache, step.rows, step.slots, step.mask)
        for b, r in enumerate(active):
            cache.lengths[r] += len(pending[r])
            steps[r] += 1
            last = logits[b, len(pending[r]) - 1]
            allowed = constraint.allowed(states[r])
            if temperature > 0:
                tok = sample(constrained_probs(last, allowed, temperature), gens[r])
            else:
                tok = constrained_argmax(last, allowed)
            nxt = constraint.advance(states[r], tok)
            assert nxt is not None
            outs[r].append(tok)
            logprobs[r].append(constrained_logprob(last, allowed, tok))
            states[r], pending[r] = nxt, [tok]
            if jump_forward:
                states[r], forced = take_forced(constraint, states[r], outs[r])
                pending[r] += forced
                logprobs[r] += [0.0] * len(forced)
        active = [r for r in active if not states[r].finished]
    return [Decoded(outs[r], constraint.list_items(outs[r]), steps[r], logprobs[r]) for r in range(len(prompts))]
