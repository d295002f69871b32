"""Our flat forward with its explicit KV cache must equal Hugging Face's LlamaForCausalLM."""

import copy
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specrec.models import packed
from specrec.models.llama import KVCache, Transformer
from specrec.models.packed import is_packed, packed_for, packing_available
from specrec.models.steps import Block, build_step

TOL = 1e-4


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory: pytest.TempPathFactory) -> tuple[LlamaForCausalLM, Transformer]:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
    hf = LlamaForCausalLM(cfg).eval()
    path: Path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return hf, Transformer.from_pretrained(path)


@pytest.fixture(params=["plain", "lean-packed", "lean-dense"])
def models(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
           hf_and_ours) -> tuple[LlamaForCausalLM, Transformer]:
    """Every test on both forwards: the target's and the drafter's lean one (`Transformer.lean`), whose projections
    run on the kernel timed faster: here each kernel is made to win (`packed.choose_kernel_by_rows`)."""
    hf, ours = hf_and_ours
    ours.lean = request.param != "plain"
    monkeypatch.setattr(packed, "_forced", request.param != "lean-dense")
    yield hf, ours
    del ours.lean


def hf_logits(hf: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0]


def run(model: Transformer, cache: KVCache, blocks: list[Block]) -> torch.Tensor:
    step = build_step(cache, blocks)
    with torch.no_grad():
        return model(step.tokens, step.positions, cache, step.rows, step.slots, step.mask)


def test_prefill_and_decode_match_hf(models):
    hf, ours = models
    seq = [1, 7, 9, 3, 22, 41, 5, 8, 13]
    cache = KVCache(ours.args, n_rows=1, max_len=64)
    logits = run(ours, cache, [Block.chain(0, seq[:6])])
    cache.lengths[0] += 6
    assert torch.allclose(logits[0], hf_logits(hf, seq[:6]), atol=TOL)
    for i in range(6, len(seq)):  # one-token decode steps against the cache
        logits = run(ours, cache, [Block.chain(0, [seq[i]])])
        cache.lengths[0] += 1
        assert torch.allclose(logits[0, 0], hf_logits(hf, seq[: i + 1])[-1], atol=TOL)


def test_tree_step_matches_each_path_and_compaction_keeps_it(models):
    hf, ours = models
    prefix = [1, 4, 6, 10]
    # root children 11, 12; 11 -> 13 -> 15; 12 -> 14
    tokens, parents = [11, 12, 13, 14, 15], [-1, -1, 0, 1, 2]
    paths = {0: [11], 1: [12], 2: [11, 13], 3: [12, 14], 4: [11, 13, 15]}
    cache = KVCache(ours.args, n_rows=1, max_len=64)
    run(ours, cache, [Block.chain(0, prefix)])
    cache.lengths[0] += len(prefix)
    logits = run(ours, cache, [Block(0, tokens, parents)])
    for node, path in paths.items():
        assert torch.allclose(logits[0, node], hf_logits(hf, prefix + path)[-1], atol=TOL), node
    cache.keep_path(0, [4 + 0, 4 + 2])  # keep 11 -> 13, then decode 16 on top
    logits = run(ours, cache, [Block.chain(0, [16])])
    assert torch.allclose(logits[0, 0], hf_logits(hf, prefix + [11, 13, 16])[-1], atol=TOL)


def test_batched_rows_of_different_lengths_match_unbatched(models):
    hf, ours = models
    prompts = [[1, 5, 6], [1, 8, 9, 10, 11, 12, 2], [1, 3]]
    cache = KVCache(ours.args, n_rows=3, max_len=64)
    logits = run(ours, cache, [Block.chain(r, p) for r, p in enumerate(prompts)])
    for r, p in enumerate(prompts):
        cache.lengths[r] += len(p)
        assert torch.allclose(logits[r, : len(p)], hf_logits(hf, p), atol=TOL)
    trees = [Block(0, [20, 21, 22], [-1, 0, -1]), Block(1, [23], [-1]), Block(2, [24, 25], [-1, 0])]
    logits = run(ours, cache, trees)
    assert torch.allclose(logits[0, 1], hf_logits(hf, prompts[0] + [20, 21])[-1], atol=TOL)
    assert torch.allclose(logits[0, 2], hf_logits(hf, prompts[0] + [22])[-1], atol=TOL)
    assert torch.allclose(logits[1, 0], hf_logits(hf, prompts[1] + [23])[-1], atol=TOL)
    assert torch.allclose(logits[2, 1], hf_logits(hf, prompts[2] + [24, 25])[-1], atol=TOL)


def test_token_packed_batch_equals_padded_and_hf(models):
    """A batch of a prefill, a plain step and a tree, run token-packed (projections and MLP on the real tokens only)
    gives the padded forward's logits and cache, and each row still equals Hugging Face's answer."""
    hf, ours = models
    prefixes = [[1, 2, 3], [1, 5, 6, 7, 8, 9, 10], [1, 4]]
    new = [Block.chain(0, [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]),  # a prefill-sized chain
           Block.chain(1, [11]),  # a plain step
           Block(2, [11, 12, 13, 14], [-1, -1, 0, 1])]  # a tree

    def fresh() -> KVCache:
        cache = KVCache(ours.args, n_rows=3, max_len=64)
        for row, prefix in enumerate(prefixes):
            run(ours, cache, [Block.chain(row, prefix)])
            cache.lengths[row] += len(prefix)
        return cache

    padded_cache, packed_cache = fresh(), fresh()
    padded = run(ours, padded_cache, new)
    step = build_step(packed_cache, new)
    assert step.n_real.tolist() == [12, 1, 4]
    with torch.no_grad():
        packed = ours(step.tokens, step.positions, packed_cache, step.rows, step.slots, step.mask, step.n_real)
    for b, block in enumerate(new):
        n, start = len(block.tokens), padded_cache.lengths[block.row]
        assert torch.allclose(packed[b, :n], padded[b, :n], atol=1e-5)
        kept = slice(start, start + n)
        assert torch.allclose(packed_cache.k[:, block.row, kept], padded_cache.k[:, block.row, kept], atol=1e-6)
    # and against HF: the prefill's last token, the plain step, the tree's deepest path (11 -> 13)
    assert torch.allclose(packed[0, 11], hf_logits(hf, prefixes[0] + new[0].tokens)[-1], atol=TOL)
    assert torch.allclose(packed[1, 0], hf_logits(hf, prefixes[1] + [11])[-1], atol=TOL)
    assert torch.allclose(packed[2, 2], hf_logits(hf, prefixes[2] + [11, 13])[-1], atol=TOL)


def test_a_forward_with_gradients_through_the_cache_backpropagates(models):
    """Training runs the cached forward with autograd: a view of one layer's cache, saved for backward, must not be
    overwritten by the next layer's cache write (the bench and small drafters, 2 layers, failed so; tiny has 1)."""
    _, ours = models
    tokens = torch.tensor([[1, 7, 9, 3], [22, 41, 5, 8]])
    cache = KVCache(ours.args, n_rows=2, max_len=8)
    positions = torch.arange(4).expand(2, 4)
    mask = torch.ones(4, 4, dtype=torch.bool).tril().expand(2, 4, 4)
    logits = ours(tokens, positions, cache, torch.arange(2), positions, mask)
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)
    ours.zero_grad()


def test_packed_projections_serve_inference_and_follow_weight_changes(models):
    """Inference runs the projections on weights packed once (the CPU speed-up the services rely on), or in the lean
    forward on stacked weights when F.linear was faster; neither copy may go stale: a weight changed after the first
    forward changes the next forward's logits."""
    _, ours = models
    assert packing_available(), "oneDNN's packed linear is missing or wrong on this machine: serving would be slower"
    seq = [1, 7, 9, 3, 22]
    cache = KVCache(ours.args, n_rows=1, max_len=64)
    before = run(ours, cache, [Block.chain(0, seq)])
    q_proj = ours.model.layers[0].self_attn.q_proj
    if not ours.lean or packed_for(len(seq)):
        assert is_packed(q_proj), "the no-grad forward did not use packed weights"
    with torch.no_grad():
        q_proj.weight.mul_(3.0)
    try:
        after = run(ours, KVCache(ours.args, n_rows=1, max_len=64), [Block.chain(0, seq)])
        dense = ours.lm_head(ours.hidden(ours.model.embed_tokens(torch.tensor([seq])), *_chain_args(ours, seq)))
    finally:
        with torch.no_grad():
            q_proj.weight.div_(3.0)
    assert not torch.allclose(after, before, atol=TOL)
    assert torch.allclose(after, dense, atol=TOL), "the packed forward used the old weights"


def test_a_model_that_served_can_be_copied(models):
    """Copies of a served model (the precision check deep-copies one) carry no packed oneDNN tensor."""
    _, ours = models
    run(ours, KVCache(ours.args, n_rows=1, max_len=64), [Block.chain(0, [1, 7, 9])])
    twin = copy.deepcopy(ours)
    assert torch.equal(twin.lm_head.weight, ours.lm_head.weight) and not is_packed(twin.lm_head)


def test_training_forward_takes_gradients_through_the_projections(models):
    _, ours = models
    seq = [1, 7, 9, 3]
    logits = ours.lm_head(ours.hidden(ours.model.embed_tokens(torch.tensor([seq])), *_chain_args(ours, seq)))
    logits.sum().backward()
    grad = ours.model.layers[0].mlp.up_proj.weight.grad
    ours.zero_grad(set_to_none=True)
    assert grad is not None and bool(grad.abs().sum() > 0)


def _chain_args(model: Transformer, seq: list[int]) -> tuple:
    """hidden()'s arguments after the embedding, for one chain in a fresh cache (autograd on: F.linear throughout)."""
    cache = KVCache(model.args, n_rows=1, max_len=64)
    step = build_step(cache, [Block.chain(0, seq)])
    return step.positions, cache, step.rows, step.slots, step.mask
