"""The benchmark's Hugging Face comparison is fair: the HF assistant is our drafter, and HF's outputs are ours.

A user comparing specrec with HF assisted generation needs both to run the same models under the same grammar:
the PAD-Rec drafter wrapped as an HF model must give the drafter's own logits (at every draft step), and HF
assisted / plain `generate` with the grammar processor must return exactly plain constrained greedy decoding.
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from bench.hf_assisted import GrammarProcessor, PadAssistant, hf_generate
from specrec.decoding.plain import decode
from specrec.drafting.model_drafter import PadDrafter


def test_wrapped_drafter_gives_the_drafters_logits_at_every_step(tiny_artifacts, tiny_drafter):
    torch.set_num_threads(1)
    pad = PadDrafter.from_pretrained(tiny_artifacts.directory / "drafter")
    hf = PadAssistant.from_drafter(tiny_artifacts.directory / "drafter")
    tokens = torch.tensor([tiny_artifacts.prompt(5)])
    lengths = torch.tensor([tokens.shape[1]])
    with torch.inference_mode():
        for step in (0, 1, 3):
            want = pad.sequence_logits(tokens, torch.full_like(tokens, step), lengths)
            hf._calls = step  # the forward counter is the draft step
            got = hf(input_ids=tokens).logits
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_hf_generate_and_assisted_equal_plain_greedy(tiny_artifacts, tiny_target, tiny_drafter):
    torch.set_num_threads(1)
    constraint = tiny_artifacts.constraint()
    users = [3, 42, 100]
    prompts = [tiny_artifacts.prompt(u) for u in users]
    want = [d.tokens for d in decode(tiny_target, constraint, prompts)]
    target = LlamaForCausalLM.from_pretrained(tiny_artifacts.target_dir).eval()
    assistant = PadAssistant.from_drafter(tiny_artifacts.directory / "drafter")
    assistant.generation_config.num_assistant_tokens_schedule = "heuristic"
    with torch.inference_mode():
        for prompt, ref in zip(prompts, want, strict=True):
            assert hf_generate(target, constraint, prompt, None) == ref
            assert hf_generate(target, constraint, prompt, assistant) == ref


def test_grammar_processor_allows_only_what_the_grammar_allows(tiny_artifacts):
    constraint = tiny_artifacts.constraint()
    prompt = tiny_artifacts.prompt(7)
    proc = GrammarProcessor(constraint, prompt)
    scores = proc(torch.tensor([prompt]), torch.zeros(1, constraint.trie.vocab.size))
    allowed = set(constraint.allowed(constraint.start(prompt)).tolist())
    assert {int(t) for t in torch.nonzero(torch.isfinite(scores[0])).flatten()} == allowed
