"""Hugging Face transformers assisted generation with our target and drafter, in one process: what a user would
pick instead of specrec. Also plain HF `generate` and our own in-process plain decoding (jump-forward on and off).

Target = `LlamaForCausalLM.from_pretrained(<artifacts>/target)`. Assistant = our PAD-Rec drafter as an HF model:
`PadAssistant` is a `LlamaForCausalLM` whose token embedding has the item-slot embedding folded in (it is a fixed
per-token offset, so the fold is exact) and whose head adds the gated draft-step embedding; the draft step is
counted per `generate` call (the first forward feeds verified tokens, step 0; the k-th later forward feeds the
k-th drafted token, step k), as our drafter does. `--assistant plain` uses the plain distilled drafter
(`drafter-no-slot-no-step-no-hass`), which is a standard Llama and loads as a bare `LlamaForCausalLM`.
The list grammar is a `LogitsProcessor` over `specrec.semantic_ids.ListConstraint` (HF applies it to the
assistant's drafts and to the target's verification logits alike). Greedy, batch 1, one torch thread.

    python bench/hf_assisted.py --profile tiny --users 8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging as hf_logging

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specrec.artifacts import Artifacts  # noqa: E402
from specrec.decoding.plain import decode  # noqa: E402
from specrec.drafting.model_drafter import PadDrafter  # noqa: E402
from specrec.models.llama import Transformer  # noqa: E402
from specrec.pipeline import prepare  # noqa: E402
from specrec.semantic_ids.constraint import ListConstraint, ListState  # noqa: E402
from specrec.semantic_ids.vocab import EOS, PAD  # noqa: E402

ASSISTANT_DIRS = {"pad": "drafter", "plain": "drafter-no-slot-no-step-no-hass"}


# -- the grammar as a logits processor ---------------------------------------------------------------

class GrammarProcessor(LogitsProcessor):
    """Masks every token the list grammar forbids after the row's tokens (batch 1: one prompt).

    States are cached by the generated suffix, so each call advances one token from a known parent."""

    def __init__(self, constraint: ListConstraint, prompt: list[int]):
        self.constraint = constraint
        self.n_prompt = len(prompt)
        self.states: dict[tuple[int, ...], ListState] = {(): constraint.start(prompt)}

    def state(self, generated: tuple[int, ...]) -> ListState | None:
        if generated in self.states:
            return self.states[generated]
        parent = self.state(generated[:-1])
        nxt = None if parent is None else self.constraint.advance(parent, generated[-1])
        if nxt is not None:
            self.states[generated] = nxt
        return nxt

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.ones_like(scores, dtype=torch.bool)
        for row in range(input_ids.shape[0]):
            st = self.state(tuple(input_ids[row, self.n_prompt:].tolist()))
            allowed = [PAD] if st is None or st.finished else self.constraint.allowed(st)
            mask[row, torch.as_tensor(allowed, dtype=torch.long)] = False
        return scores.masked_fill(mask, -float("inf"))


# -- the PAD-Rec drafter as an HF model --------------------------------------------------------------

def llama_config(pad: PadDrafter) -> LlamaConfig:
    a = pad.args
    return LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.intermediate,
                       num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                       rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, max_position_embeddings=a.max_len,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)


class PadAssistant(LlamaForCausalLM):
    """LlamaForCausalLM + PAD-Rec's draft-step head; the slot embedding lives folded in embed_tokens."""

    def __init__(self, config: LlamaConfig, max_steps: int = 16, use_step: bool = True):
        super().__init__(config)
        self.max_steps, self.use_step = max_steps, use_step
        self.step_embed = torch.nn.Embedding(max_steps + 1, config.hidden_size)
        self.step_gate = torch.nn.Linear(2 * config.hidden_size, config.hidden_size)
        self._calls = 0

    @classmethod
    def from_drafter(cls, directory: Path) -> PadAssistant:
        pad = PadDrafter.from_pretrained(directory)
        c = pad.config
        model = cls(llama_config(pad), max_steps=c.max_steps, use_step=c.use_step)
        state = {k.removeprefix("lm."): v for k, v in pad.state_dict().items() if k.startswith("lm.")}
        if c.use_slot:  # E'[t] = E[t] + lambda * E_slot[slot(t)]: exact, the slot is a function of the token
            state["model.embed_tokens.weight"] = pad.embed(torch.arange(c.vocab.size)[None])[0].detach()
        state["step_embed.weight"] = pad.step_embed.weight.detach()
        state["step_gate.weight"] = pad.step_gate.weight.detach()
        state["step_gate.bias"] = pad.step_gate.bias.detach()
        model.load_state_dict(state, strict=False)
        return model.eval()

    def generate(self, *args, **kwargs):  # noqa: ANN002, ANN003 - HF's signature
        self._calls = 0  # one assisted round = one generate call: its first forward feeds verified tokens
        return super().generate(*args, **kwargs)

    def forward(self, input_ids=None, logits_to_keep=0, **kwargs):  # noqa: ANN001, ANN003 - HF's signature
        step = min(self._calls, self.max_steps)
        self._calls += 1
        kwargs.pop("labels", None)
        out = self.model(input_ids=input_ids, **kwargs)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        if self.use_step:
            e = self.step_embed(torch.full(h.shape[:2], step, dtype=torch.long))
            h = h + torch.sigmoid(self.step_gate(torch.cat([h, e], dim=-1))) * e
        return CausalLMOutputWithPast(logits=self.lm_head(h), cache=out.cache)


def load_assistant(arts: Artifacts, kind: str) -> LlamaForCausalLM:
    directory = arts.directory / ASSISTANT_DIRS[kind]
    if kind == "plain":  # no slot, no step: a standard Llama under the `lm.` prefix
        pad = PadDrafter.from_pretrained(directory)
        model = LlamaForCausalLM(llama_config(pad))
        model.load_state_dict({k.removeprefix("lm."): v for k, v in pad.state_dict().items() if k.startswith("lm.")})
        return model.eval()
    return PadAssistant.from_drafter(directory)


# -- counting forwards -------------------------------------------------------------------------------

class Counter:
    def __init__(self, model: torch.nn.Module):
        self.n = 0
        model.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.n += 1


# -- one request each way ----------------------------------------------------------------------------

def hf_generate(target: LlamaForCausalLM, constraint: ListConstraint, prompt: list[int],
                assistant: LlamaForCausalLM | None) -> list[int]:
    """Greedy constrained generate (assisted when `assistant` is given); the generated tokens through EOS."""
    max_new = constraint.n_items * (constraint.trie.depth + 1) + 1
    ids = torch.tensor([prompt])
    extra = {"assistant_model": assistant} if assistant is not None else {}
    out = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                          eos_token_id=EOS, pad_token_id=PAD,
                          logits_processor=LogitsProcessorList([GrammarProcessor(constraint, prompt)]), **extra)
    return out[0, len(prompt):].tolist()


def measure(name: str, fn, prompts: list[list[int]], users: list[int], repeats: int, warmup: int,
            counters: dict[str, Counter]) -> list[dict]:
    """Every user `repeats` times (warm-up excluded); per-request latency, tokens and model forwards."""
    for p in prompts[:warmup]:
        fn(p)
    recs = []
    for rep in range(repeats):
        for u, p in zip(users, prompts, strict=True):
            before = {k: c.n for k, c in counters.items()}
            t0 = time.perf_counter()
            toks = fn(p)
            ms = (time.perf_counter() - t0) * 1000
            rec = {"config": name, "user": u, "rep": rep, "latency_ms": ms, "tokens": toks, "n_tokens": len(toks)}
            rec.update({f"{k}_forwards": c.n - before[k] for k, c in counters.items()})
            recs.append(rec)
    return recs


def summarize(recs: list[dict], reference: dict[int, list[int]]) -> dict:
    lat = [r["latency_ms"] for r in recs]
    fw = [r.get("target_forwards", 0) for r in recs]
    toks = [r["n_tokens"] for r in recs]
    mism = sorted({r["user"] for r in recs if r["tokens"] != reference[r["user"]]})
    return {"n": len(recs), "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
            "p99_ms": float(np.percentile(lat, 99)), "mean_ms": statistics.fmean(lat),
            "tokens_per_s": sum(toks) / (sum(lat) / 1000), "target_forwards": statistics.fmean(fw),
            "tau": sum(toks) / max(sum(fw), 1), "mismatched_users": mism}


def run(arts: Artifacts, users: list[int], repeats: int = 3, warmup: int = 2, assistants: tuple[str, ...] = ("pad",),
        n_items: int = 10) -> dict:
    """Every configuration on every user, `repeats` times; configurations run back to back (not interleaved), so
    a drift in machine load between them shows up in their ratios."""
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    constraint = arts.constraint(n_items)
    prompts = [arts.prompt(u) for u in users]
    ours = Transformer.from_pretrained(arts.target_dir)
    reference = {u: d.tokens for u, d in zip(users, decode(ours, constraint, prompts), strict=True)}
    target = LlamaForCausalLM.from_pretrained(arts.target_dir, dtype=torch.float32).eval()
    counters = {"target": Counter(target)}
    configs = {"ours plain (jump-forward)": lambda p: decode(ours, constraint, [p])[0].tokens,
               "ours plain (no jump-forward)": lambda p: decode(ours, constraint, [p], jump_forward=False)[0].tokens,
               "hf generate": lambda p: hf_generate(target, constraint, p, None)}
    for kind in assistants:
        if not (arts.directory / ASSISTANT_DIRS[kind] / "config.json").is_file():
            continue
        asst = load_assistant(arts, kind)
        asst.generation_config.num_assistant_tokens_schedule = "heuristic"
        counters[f"assistant_{kind}"] = Counter(asst)
        configs[f"hf assisted ({kind})"] = lambda p, a=asst: hf_generate(target, constraint, p, a)
    out: dict = {"configs": {}, "records": []}
    with torch.inference_mode():
        for name, fn in configs.items():
            recs = measure(name, fn, prompts, users, repeats, warmup, counters)
            if name.startswith("ours"):  # our decode counts its own forwards
                for r in recs:
                    r["target_forwards"] = 0
            out["records"] += [{k: v for k, v in r.items() if k != "tokens"} for r in recs]
            out["configs"][name] = summarize(recs, reference)
    steps = {jf: [d.model_steps for d in decode(ours, constraint, prompts, jump_forward=jf)] for jf in (True, False)}
    for name, jf in (("ours plain (jump-forward)", True), ("ours plain (no jump-forward)", False)):
        c = out["configs"][name]
        c["target_forwards"] = statistics.fmean(steps[jf])
        c["tau"] = statistics.fmean(len(reference[u]) for u in users) / c["target_forwards"]
    n_tok = statistics.fmean(len(t) for t in reference.values())
    out["forced_share"] = 1 - statistics.fmean(steps[True]) / statistics.fmean(steps[False])
    out["tokens_per_list"] = n_tok
    out["assistant_settings"] = {"num_assistant_tokens_schedule": "heuristic", "num_assistant_tokens_start": 20,
                                 "assistant_confidence_threshold": 0.4,
                                 "note": "HF defaults otherwise; scikit-learn absent, so the threshold stays fixed"}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="tiny")
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--assistants", default="pad,plain")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    a = p.parse_args(argv)
    from bench.speedup import histories  # the same users as the stack bench
    arts = prepare(a.dataset, a.profile, train=False, progress=False)
    users = [u for u, _ in histories(arts, a.users)]
    res = run(arts, users, a.repeats, assistants=tuple(a.assistants.split(",")))
    for name, c in res["configs"].items():
        print(f"{name:32s} p50 {c['p50_ms']:7.1f} ms  mean {c['mean_ms']:7.1f}  tau {c['tau']:.2f}  "
              f"forwards {c['target_forwards']:.1f}  mismatches {c['mismatched_users'] or '-'}")
    print(f"forced-token share (steps saved by jump-forward): {res['forced_share']:.1%}")
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    return 1 if any(c["mismatched_users"] for c in res["configs"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
