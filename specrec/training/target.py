"""Train the target: a Hugging Face Llama on list-wise examples, saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specrec.models.profiles import TargetProfile
from specrec.semantic_ids.codebook import SemanticIds
from specrec.semantic_ids.vocab import PAD
from specrec.training.examples import make_example, window_index
from specrec.training.loop import train

TARGET_DIR = "target"


def llama_config(profile: TargetProfile, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=profile.hidden, num_hidden_layers=profile.layers,
                       num_attention_heads=profile.heads, num_key_value_heads=profile.heads,
                       intermediate_size=profile.intermediate, max_position_embeddings=profile.max_len,
                       rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                       pad_token_id=PAD, bos_token_id=1, eos_token_id=2)


def pad_batch(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids [B, T] and labels (-100 on padding)."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s)
    labels = ids.masked_fill(ids == PAD, -100)
    return ids, labels


def train_target(sids: SemanticIds, sequences: list[np.ndarray], profile: TargetProfile, out_dir: Path,
                 seed: int = 0, progress: bool = True) -> Path:
    """Train and save to out_dir/target (HF format); resumable from out_dir/target.train."""
    windows = window_index(sequences, profile.list_len)
    if len(windows) == 0:
        raise ValueError(f"no user has {profile.list_len} training items: nothing to train on")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(profile, sids.vocab.size))

    def loss_fn(rng: np.random.Generator) -> torch.Tensor:
        picks = windows[rng.integers(len(windows), size=profile.batch_size)]
        seqs = [make_example(sids, sequences, int(u), int(t), profile.max_history, profile.list_len)
                for u, t in picks]
        ids, labels = pad_batch(seqs)
        return model(input_ids=ids, attention_mask=(ids != PAD).long(), labels=labels).loss

    train(model, loss_fn, profile.steps, profile.lr, out_dir / f"{TARGET_DIR}.train", seed=seed,
          desc=f"target[{profile.name}]", progress=progress)
    target_dir = out_dir / TARGET_DIR
    model.save_pretrained(target_dir)
    return target_dir
