"""A small flat Llama forward with an explicit preallocated KV cache (gpt-fast in spirit).

One `forward` serves prefill, one-token decode and tree steps: every new token carries its own
position, the cache slot it is written to, and a mask over cache slots saying what it may attend to.
Parameter names follow Hugging Face's LlamaForCausalLM, so its checkpoints load as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from specrec.models.packed import packed_linear, stacked_linear


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    max_len: int = 512
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelArgs:
        return cls(vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                   n_heads=cfg["num_attention_heads"],
                   n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                   intermediate=cfg["intermediate_size"], rope_theta=float(cfg.get("rope_theta", 10000.0)),
                   norm_eps=cfg.get("rms_norm_eps", 1e-6), max_len=cfg.get("max_position_embeddings", 512),
                   tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def _as_range(rows: torch.Tensor) -> slice | None:
    """rows as a slice when they are consecutive cache rows on the CPU (checking costs a device sync elsewhere)."""
    if rows.device.type != "cpu":
        return None
    first, n = int(rows[0]), len(rows)
    return slice(first, first + n) if torch.equal(rows, torch.arange(first, first + n)) else None


class KVCache:
    """Keys and values per (layer, row, slot). A row holds one sequence: its committed tokens in
    slots [0, length), scratch (e.g. tree nodes) after that. Rejected slots are simply overwritten."""

    def __init__(self, args: ModelArgs, n_rows: int, max_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.max_len = max_len or args.max_len
        shape = (args.n_layers, n_rows, self.max_len, args.n_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * n_rows

    @property
    def n_rows(self) -> int:
        return self.k.shape[1]

    @torch.inference_mode()  # the cache may have been made in inference mode; edits must be too
    def keep_path(self, row: int, src_slots: list[int]) -> None:
        """Compact: move the kept scratch slots to follow the committed prefix, and commit them."""
        self.move(row, src_slots, self.lengths[row])
        self.lengths[row] += len(src_slots)

    def move(self, row: int, src_slots: list[int], first: int) -> None:
        """Copy entries of these slots to slots first, first + 1, ... (the sources are read before any write)."""
        dst = torch.arange(first, first + len(src_slots))
        src = torch.as_tensor(src_slots, dtype=torch.long)
        if not torch.equal(src, dst):
            self.k[:, row, dst] = self.k[:, row, src]
            self.v[:, row, dst] = self.v[:, row, src]


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        self.q_proj = nn.Linear(a.dim, a.n_heads * a.head_dim, bias=False)
        self.k_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.v_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.o_proj = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=False)


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.dim, a.intermediate, bias=False)
        self.up_proj = nn.Linear(a.dim, a.intermediate, bias=False)
        self.down_proj = nn.Linear(a.intermediate, a.dim, bias=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.self_attn = Attention(a)
        self.mlp = MLP(a)
        self.input_layernorm = RMSNorm(a.dim, a.norm_eps)
        self.post_attention_layernorm = RMSNorm(a.dim, a.norm_eps)


class Decoder(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    # > 0: the batch-invariant forward (see `specrec.models.precision`): projections run in chunks of at most this
    # many tokens, attention one query at a time over a span set by its key count, logits row by row in float32
    invariant_rows = 0
    # The lean forward (the drafter's): fewer, fused operations. A drafter step feeds 1-8 tokens, and at that size
    # a forward is mostly fixed cost per operation (bench drafter, 4 rows: 163 operations, ~470 us of its ~690 us
    # with the model shrunk to nothing). q/k/v and gate/up each run as one stacked product, RMSNorm as one kernel,
    # rotary embedding from a table, on q and k at once; projections on the kernel timed faster here at the step's
    # row count (`packed.choose_kernel_by_rows`). The target keeps the plain forward: these kernels may round
    # differently, and its lists must not move.
    lean = False

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the body (and of its KV cache); the logits are float32 in the batch-invariant forward."""
        return self.model.embed_tokens.weight.dtype

    def new_cache(self, n_rows: int, max_len: int | None = None) -> KVCache:
        return KVCache(self.args, n_rows, max_len, device=self.model.embed_tokens.weight.device, dtype=self.dtype)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str = "cpu") -> Transformer:
        directory = Path(directory)
        args = ModelArgs.from_hf(json.loads((directory / "config.json").read_text()))
        model = cls(args)
        state = load_file(str(directory / "model.safetensors"))
        if args.tie_embeddings or "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # [B, T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().unsqueeze(2), emb.sin().unsqueeze(2)  # [B, T, 1, D]

    def hidden(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, rows: torch.Tensor,
               slots: torch.Tensor, mask: torch.Tensor, n_real: torch.Tensor | None = None) -> torch.Tensor:
        """Run the decoder on input embeddings x [B, T, dim]; returns final-normed hidden [B, T, dim].

        positions, slots: [B, T]; rows: [B] cache rows; mask: [B, T, S] bool over cache slots 0..S-1.
        n_real [B]: row b holds n_real[b] real tokens, then padding; the projections and the MLP then run on the
        real tokens only (token-packed), attention on the padded rows. Padding's hidden states come out as zeros.
        """
        bsz, t, dim = x.shape
        real = _real_tokens(n_real, t) if n_real is not None else None
        if real is None and self.lean and not self.invariant_rows:
            return self._lean_layers(x.reshape(bsz * t, dim), positions, cache, rows, slots, mask).view(bsz, t, dim)
        if real is None:
            return self.model.norm(self._layers(x.reshape(bsz * t, dim), positions, cache, rows, slots, mask, None,
                                                (bsz, t))).view(bsz, t, dim)
        packed = self._layers(x.reshape(bsz * t, dim)[real], positions, cache, rows, slots, mask, real, (bsz, t))
        return _unpack(self.model.norm(packed), real, bsz, t)

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, rows: torch.Tensor,
                slots: torch.Tensor, mask: torch.Tensor, real: torch.Tensor | None,
                shape: tuple[int, int]) -> torch.Tensor:
        """The decoder layers over tokens x [N, dim]: all B x T of them (real None), or the real ones at `real`
        (flat indices into B x T), unpacked to [B, T] for attention only."""
        a = self.args
        bsz, t = shape
        cos, sin = self.rope(positions)
        cos, sin = cos.reshape(bsz * t, 1, -1).to(x.dtype), sin.reshape(bsz * t, 1, -1).to(x.dtype)
        if real is not None:
            cos, sin = cos[real], sin[real]
        span = mask.shape[-1]
        attn_mask = mask.unsqueeze(1)  # [B, 1, T, S]
        row_idx = rows.unsqueeze(1).expand(bsz, t)
        # Under autograd a view would be saved for backward and then overwritten by the next step's cache write.
        rows_view = None if torch.is_grad_enabled() else _as_range(rows)
        invariant = [key_groups(m, cache.max_len) for m in mask] if self.invariant_rows else None
        for i, layer in enumerate(self.model.layers):
            h = layer.input_layernorm(x)
            att = layer.self_attn
            q = self._proj(att.q_proj, h).view(-1, a.n_heads, a.head_dim)
            k = self._proj(att.k_proj, h).view(-1, a.n_kv_heads, a.head_dim)
            v = self._proj(att.v_proj, h).view(-1, a.n_kv_heads, a.head_dim)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            if real is not None:  # padding gets zeros: written to its own scratch slot, its output dropped
                q, k, v = (_unpack(z, real, bsz, t) for z in (q, k, v))
            q, k, v = (z.view(bsz, t, z.shape[-2], a.head_dim) for z in (q, k, v))
            cache.k[i, row_idx, slots] = k
            cache.v[i, row_idx, slots] = v
            if invariant is not None:
                out = self._attend_one_by_one(q, cache, i, rows, invariant).reshape(bsz * t, -1)
                x = self._mix(layer, x, out, real)
                continue
            if rows_view is not None:  # a view, not a gather: copying every row's cache dominated batched steps
                keys, values = cache.k[i, rows_view, :span], cache.v[i, rows_view, :span]
            else:
                keys, values = cache.k[i, rows, :span], cache.v[i, rows, :span]
            keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [B, Hkv, S, D]
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=attn_mask,
                                                 enable_gqa=a.n_kv_heads != a.n_heads)
            out = out.transpose(1, 2).reshape(bsz * t, -1)
            x = self._mix(layer, x, out, real)
        return x

    def _mix(self, layer: nn.Module, x: torch.Tensor, attended: torch.Tensor,
             real: torch.Tensor | None) -> torch.Tensor:
        """The layer after attention: output projection, residual, MLP, residual."""
        x = x + self._proj(layer.self_attn.o_proj, attended if real is None else attended[real])
        h = layer.post_attention_layernorm(x)
        mlp = layer.mlp
        return x + self._proj(mlp.down_proj, F.silu(self._proj(mlp.gate_proj, h)) * self._proj(mlp.up_proj, h))

    def _lean_layers(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, rows: torch.Tensor,
                     slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`_layers` then the final norm, for every token of x [B * T, dim], in fewer operations (see `lean`)."""
        a = self.args
        bsz, t = positions.shape
        heads, n_q, eps = a.n_heads + 2 * a.n_kv_heads, a.n_heads, a.norm_eps
        table, rotate = self._rope_table(cache.max_len)
        cos_sin = table[positions.reshape(-1)]  # [N, 2, 1, D]
        cos, sin = cos_sin[:, 0], cos_sin[:, 1]
        attn_mask, row_idx = mask.unsqueeze(1), rows.unsqueeze(1).expand(bsz, t)
        rows_view = None if torch.is_grad_enabled() else _as_range(rows)
        span = mask.shape[-1]
        for i, block in enumerate(self.model.layers):
            layer = cast(Block, block)
            att, mlp = layer.self_attn, layer.mlp
            h = F.rms_norm(x, (a.dim,), layer.input_layernorm.weight, eps)
            qkv = stacked_linear((att.q_proj, att.k_proj, att.v_proj), h, timed=True).view(-1, heads, a.head_dim)
            qk = qkv[:, : n_q + a.n_kv_heads]
            qk = qk * cos + (qk @ rotate) * sin  # q and k rotated at once; `rotate` is rotate_half as a matrix
            q = qk[:, :n_q].view(bsz, t, n_q, a.head_dim)
            k = qk[:, n_q:].view(bsz, t, a.n_kv_heads, a.head_dim)
            cache.k[i, row_idx, slots] = k
            cache.v[i, row_idx, slots] = qkv[:, n_q + a.n_kv_heads:].view(bsz, t, a.n_kv_heads, a.head_dim)
            where = rows_view if rows_view is not None else rows
            keys, values = cache.k[i, where, :span].transpose(1, 2), cache.v[i, where, :span].transpose(1, 2)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=attn_mask,
                                                 enable_gqa=a.n_kv_heads != a.n_heads)
            x = x + packed_linear(att.o_proj, out.transpose(1, 2).reshape(bsz * t, -1), timed=True)
            h = F.rms_norm(x, (a.dim,), layer.post_attention_layernorm.weight, eps)
            gate, up = stacked_linear((mlp.gate_proj, mlp.up_proj), h, timed=True).chunk(2, dim=-1)
            x = x + packed_linear(mlp.down_proj, F.silu(gate) * up, timed=True)
        return F.rms_norm(x, (a.dim,), cast(RMSNorm, self.model.norm).weight, eps)

    def _rope_table(self, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of positions 0 .. 2 * slots - 1 [n, 2, 1, D] (a position never exceeds its cache slot: a node
        is placed after its ancestors), and rotate_half as a [D, D] matrix (x @ it = rotate_half(x), exactly)."""
        cached = getattr(self, "_rope_cache", None)
        device = cast(torch.Tensor, self.inv_freq).device
        if cached is None or len(cached[0]) < 2 * slots or cached[0].device != device \
                or cached[0].dtype != self.dtype:  # the model moved or was cast since
            cos, sin = self.rope(torch.arange(2 * slots, device=device)[None])
            table = torch.stack([cos[0], sin[0]], dim=1).to(self.dtype)  # [n, 2, 1, D]
            d = self.args.head_dim // 2
            rotate = torch.zeros(2 * d, 2 * d, device=table.device, dtype=table.dtype)
            rotate[d:, :d] = -torch.eye(d)
            rotate[:d, d:] = torch.eye(d)
            cached = self._rope_cache = (table, rotate)
        return cached

    def _proj(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """linear(x); in the batch-invariant forward, in chunks of rows whose kernel computes each row alike, and at
        least MIN_ROWS rows (zero-padded: bfloat16 kernels on the CPU run a few rows faster than one)."""
        n = self.invariant_rows
        if not n:
            return packed_linear(linear, x)
        if x.shape[0] < MIN_ROWS:
            return packed_linear(linear, torch.cat([x, x.new_zeros((MIN_ROWS - x.shape[0], x.shape[1]))]))[: x.shape[0]]
        if x.shape[0] > n:
            return torch.cat([packed_linear(linear, chunk) for chunk in x.split(n)])
        return packed_linear(linear, x)

    def _attend_one_by_one(self, q: torch.Tensor, cache: KVCache, layer: int, rows: torch.Tensor,
                           plans: list[list[_KeyGroup]]) -> torch.Tensor:
        """Attention of q [B, T, H, D], each query alone over its visible keys packed in sequence order into a span
        fixed by how many keys it sees: a token's output bits then depend on its own keys only, not on the batch,
        the tree around it or the cache slots its keys sit in (a tree node's ancestors are not contiguous)."""
        out = q.new_zeros(q.shape)
        for b, groups in enumerate(plans):
            keys, values = cache.k[layer, int(rows[b])], cache.v[layer, int(rows[b])]  # [slots, Hkv, D]
            for g in groups:
                n = len(g.queries)
                if g.gather is None:
                    k = keys[: g.span].transpose(0, 1).unsqueeze(0).expand(n, -1, -1, -1)
                    v = values[: g.span].transpose(0, 1).unsqueeze(0).expand(n, -1, -1, -1)
                else:
                    k, v = keys[g.gather].transpose(1, 2), values[g.gather].transpose(1, 2)  # [n, Hkv, span, D]
                o = F.scaled_dot_product_attention(q[b, g.queries].unsqueeze(2), k, v,
                                                   attn_mask=g.visible[:, None, None],
                                                   enable_gqa=self.args.n_kv_heads != self.args.n_heads)
                out[b, g.queries] = o[:, :, 0]
        return out

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, rows: torch.Tensor,
                slots: torch.Tensor, mask: torch.Tensor, n_real: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for tokens [B, T] (zeros at padding when n_real is given); see `hidden`."""
        bsz, t = tokens.shape
        real = _real_tokens(n_real, t) if n_real is not None else None
        if real is None:
            h = self.hidden(self.model.embed_tokens(tokens), positions, cache, rows, slots, mask)
            return self.logits(h.reshape(bsz * t, -1)).view(bsz, t, -1)
        x = self.model.embed_tokens(tokens.reshape(-1)[real])
        h = self.model.norm(self._layers(x, positions, cache, rows, slots, mask, real, (bsz, t)))
        return _unpack(self.logits(h), real, bsz, t)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head over hidden states [N, dim]; in the batch-invariant forward, float32 one row at a time (a
        single-row product is the same computation whatever the batch, and bfloat16 logits would tie often)."""
        if not self.invariant_rows:
            return packed_linear(self.lm_head, h)
        w = self.lm_head.weight  # float32: set_precision keeps it
        return torch.cat([F.linear(row, w) for row in h.float().split(1)]) if len(h) else w.new_zeros((0, len(w)))


MIN_ROWS = 8  # the batch-invariant forward pads projections to this many rows (see `_proj`)
SPAN_STEP = 64  # the batch-invariant attention's spans: a query seeing n keys attends over ceil(n / 64) * 64


@dataclass
class _KeyGroup:
    """Queries of one cache row that attend over the same span in the batch-invariant attention."""

    queries: torch.Tensor  # indices among the row's T queries
    span: int
    visible: torch.Tensor  # [n, span] bool: each query sees the first k of the packed keys
    gather: torch.Tensor | None  # [n, span] cache slots to pack (None: the keys already are the cache's prefix)


def key_groups(mask: torch.Tensor, slots: int) -> list[_KeyGroup]:
    """Group a row's queries (mask [T, S] over cache slots) by span; the span depends only on how many keys a query
    sees, so a token gets the same one whatever forward it is in."""
    counts = mask.sum(-1)
    spans = ((counts + SPAN_STEP - 1) // SPAN_STEP).clamp(min=1) * SPAN_STEP
    groups = []
    for span in spans.unique().tolist():
        queries = (spans == span).nonzero().squeeze(1)
        m, c = mask[queries], counts[queries]
        visible = torch.arange(span, device=mask.device)[None, :] < c[:, None]
        width = min(span, m.shape[-1])
        prefix = bool((m[:, :width] == visible[:, :width]).all()) and not bool(m[:, width:].any()) and span <= slots
        if prefix:
            groups.append(_KeyGroup(queries, span, visible, None))
            continue
        # a stable sort puts each query's visible slots first, in slot order; the rest point at slot 0 (masked)
        order = torch.sort((~m).to(torch.int8), dim=-1, stable=True).indices[:, :span]
        order = torch.where(visible[:, : order.shape[-1]], order, torch.zeros_like(order))
        gather = F.pad(order, (0, span - order.shape[-1])) if order.shape[-1] < span else order
        groups.append(_KeyGroup(queries, span, visible, gather))
    return groups


def _real_tokens(n_real: torch.Tensor, t: int) -> torch.Tensor | None:
    """Flat indices (b * t + j) of the real tokens, or None when there is no padding to skip."""
    keep = torch.arange(t, device=n_real.device)[None, :] < n_real[:, None]
    return None if bool(keep.all()) else keep.reshape(-1).nonzero().squeeze(1)


def _unpack(x: torch.Tensor, real: torch.Tensor, bsz: int, t: int) -> torch.Tensor:
    """Packed rows x [N, ...] back to [B * T, ...] (zeros at padding), then viewed [B, T, ...]."""
    out = x.new_zeros((bsz * t, *x.shape[1:]))
    out[real] = x
    return out.view(bsz, t, *x.shape[1:])
