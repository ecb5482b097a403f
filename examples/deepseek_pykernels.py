"""Hugging Face's DeepSeek-V3 modules replaced by pykernels ops (examples/deepseek_tiny.py runs them).

`substitute(model, kernels, buffer=None)` swaps, in place, inside every decoder layer:

- each nn.Linear -> `Fp8Linear`: the weight as e4m3 with 128x128 block scales, the input
  quantized 1x128 per token, `pykernels.fp8_gemm_nt` (DeepSeek-V3's FP8 recipe);
- each DeepseekV3Experts -> `Fp8Experts`: the routed experts through
  `m_grouped_fp8_gemm_nt_contiguous` (a prompt: many tokens) or `m_grouped_fp8_gemm_nt_masked`
  (a decode step: one token per sequence); with a `pykernels.ep.Buffer`, each rank holds its
  share of the experts, tokens are dispatched (in FP8) to the ranks holding their experts,
  weighted there, and combined back (DeepEP's semantics: combine sums the rows it receives);
- each DeepseekV3Attention -> `PagedMLA`: a prompt runs the model's own attention, whose
  `cache.update` also writes the paged latent cache (`PagedLatentCache`); a decode step runs
  the absorbed MLA through `pykernels.flash_mla_with_kvcache` over the pages.

Kept as the model has them, as DeepSeek-V3's FP8 checkpoint keeps them: the embeddings, the
norms, the router (float32) and lm_head. transformers' own code is not edited.
"""
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

import pykernels as pk
from pykernels import mla

BLOCK = 128                       # FP8 scale block: 1x128 per token, 128x128 per weight block
PAGE = mla.PAGE_BLOCK_SIZE        # 64 tokens per page of the MLA cache
LATENT = mla.HEAD_DIM_V           # 512: the compressed KV (FlashMLA's V)
ROPE = mla.HEAD_DIM_QK - LATENT   # 64: the shared RoPE key


@dataclass
class Kernels:
    """Which pykernels backend runs every substituted op, and what the ops share.

    backend: "reference", "triton", "emu", "cuda" or "auto": the GEMMs and the MLA decode.
    cast_backend: the FP8 casts (per_token_cast_to_fp8, per_block_cast_to_fp8); None: backend.
    Every backend casts bit for bit alike (tests/test_triton_fp8.py, test_quant_emu.py), so the
    CPU runs take the reference here: the interpreter spends ~0.5 s on each small cast.
    mla_sm_parts: split-KV partitions of the MLA schedule (get_mla_metadata's num_sm_parts);
    None takes pykernels' default for the device (the SM count); the CPU backends run one
    program per partition, so a small number keeps them fast.
    poison: NaN-fill every output buffer first, so rows a kernel fails to write show up.
    """
    backend: str = "auto"
    cast_backend: str = None
    mla_sm_parts: int = None
    poison: bool = False
    _memo: tuple = field(default=None, repr=False)

    @property
    def casts(self) -> str:
        return self.cast_backend or self.backend

    def empty(self, *shape, device, dtype=torch.bfloat16) -> torch.Tensor:
        fill = float("nan") if self.poison else 0.0
        return torch.full(shape, fill, dtype=dtype, device=device)

    def quantize(self, x: torch.Tensor):
        """x [..., k] -> (e4m3 [m, k], float32 [m, k/128]), m the product of the leading dims.
        q_a_proj / kv_a_proj_with_mqa and gate_proj / up_proj read the same tensor: it is
        quantized once (the memo holds the last input, compared by identity)."""
        if self._memo is not None and self._memo[0] is x:
            return self._memo[1]
        pair = pk.per_token_cast_to_fp8(x.reshape(-1, x.shape[-1]).contiguous(), backend=self.casts)
        self._memo = (x, pair)
        return pair


def quantize_weight(w: torch.Tensor, backend: str):
    """[n, k] or [E, n, k] -> (e4m3 of w's shape, float32 [(E,) n/128, k/128]) per 128x128 block."""
    if w.dim() == 2:
        return pk.per_block_cast_to_fp8(w.contiguous(), backend=backend)
    pairs = [pk.per_block_cast_to_fp8(w[e].contiguous(), backend=backend) for e in range(w.shape[0])]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


def dequantize_weight(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(e4m3 [n, k], float32 [n/128, k/128]) -> float32 [n, k], the values the GEMM multiplies."""
    n, k = q.shape
    return q.float() * s.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]


class Fp8Linear(nn.Module):
    """nn.Linear without bias as an FP8 GEMM: x [..., in] (bf16) -> bf16 [..., out]."""

    def __init__(self, linear: nn.Linear, kernels: Kernels):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Fp8Linear: expected a linear layer without bias (DeepSeek-V3's attention_bias=False)")
        self.kernels = kernels
        self.out_features, self.in_features = linear.weight.shape
        w, s = quantize_weight(linear.weight.detach(), kernels.casts)
        self.register_buffer("weight_fp8", w)
        self.register_buffer("weight_scale", s)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_weight(self.weight_fp8, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.kernels.empty(x.numel() // self.in_features, self.out_features, device=x.device)
        pk.fp8_gemm_nt(self.kernels.quantize(x), (self.weight_fp8, self.weight_scale), out,
                       backend=self.kernels.backend)
        return out.view(*x.shape[:-1], self.out_features)


def contiguous_rows(experts: torch.Tensor, num_experts: int, align: int):
    """The contiguous grouped layout of P (row, expert) pairs: each expert's pairs in one
    segment padded to `align` rows. experts int64 [P] -> (pos int64 [P], the row of each pair;
    m_indices int32 [rows], the expert of each row, -1 for padding)."""
    counts = torch.bincount(experts, minlength=num_experts)
    padded = (counts + align - 1) // align * align
    starts = torch.cumsum(padded, 0) - padded
    rank = rank_within_group(experts, counts)
    pos = starts[experts] + rank
    m_indices = torch.full((int(padded.sum()),), -1, dtype=torch.int32, device=experts.device)
    m_indices[pos] = experts.to(torch.int32)
    return pos, m_indices


def rank_within_group(groups: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """int64 [P] group ids -> the index of each element among its group's (stable order)."""
    order = torch.argsort(groups, stable=True)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(groups)
    rank[order] = torch.arange(groups.numel(), device=groups.device) - first[groups[order]]
    return rank


class Fp8Experts(nn.Module):
    """Replaces DeepseekV3Experts, same call: hidden bf16 [T, H], top_k_index int64 [T, K],
    top_k_weights float32 [T, K] -> bf16 [T, H], the weighted sum of each token's experts.

    `decode` (set before each call by the MoE block's pre-hook, `substitute`) chooses the
    masked layout (one token per sequence) over the contiguous one. With `buffer` (a
    pykernels.ep.Buffer over R ranks) this rank holds experts [r E/R, (r+1) E/R)."""

    def __init__(self, experts: nn.Module, kernels: Kernels, buffer=None):
        super().__init__()
        self.kernels, self.buffer = kernels, buffer
        self.num_experts = experts.num_experts
        ranks, rank = (buffer.num_ranks, buffer.rank) if buffer is not None else (1, 0)
        if self.num_experts % ranks:
            raise ValueError(f"Fp8Experts: {self.num_experts} experts do not split over {ranks} ranks")
        local = slice(rank * self.num_experts // ranks, (rank + 1) * self.num_experts // ranks)
        self.num_local = local.stop - local.start
        self.gate_up = quantize_weight(experts.gate_up_proj.detach()[local], kernels.casts)   # [E, 2I, H]
        self.down = quantize_weight(experts.down_proj.detach()[local], kernels.casts)         # [E, H, I]
        self.act_fn = experts.act_fn
        self.decode = False

    def forward(self, hidden, top_k_index, top_k_weights):
        x = self.kernels.quantize(hidden)
        if self.buffer is None:
            return self.local_experts(x, top_k_index, top_k_weights.float(), hidden.dtype)
        # DeepEP's V1 call forms and semantics (this code runs on deep_ep.Buffer too): the
        # layout, then the FP8 rows dispatched with global ids and weights; each receiving
        # rank gets local ids (-1 for experts elsewhere), weights its expert outputs itself,
        # and combine sums the rows of each token back on its source rank.
        per_rank, per_rdma_rank, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(top_k_index,
                                                                                           self.num_experts)
        recv_x, recv_idx, recv_w, _, handle, _ = self.buffer.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=top_k_index, topk_weights=top_k_weights.float())
        y = self.local_experts(recv_x, recv_idx, recv_w, torch.bfloat16)
        combined, _, _ = self.buffer.combine(y, handle)
        return combined.to(hidden.dtype)

    def local_experts(self, x, idx, weights, dtype):
        """x (e4m3 [N, H], float32 [N, H/128]); idx int64 [N, K] local expert ids (-1: none
        here); weights float32 [N, K] -> dtype [N, H]: sum over k of weights * expert(x)."""
        n, h = x[0].shape
        y = torch.zeros(n, h, dtype=dtype, device=x[0].device)
        rows, slots = (idx >= 0).nonzero(as_tuple=True)
        if rows.numel() == 0:
            return y
        experts = idx[rows, slots]
        run = self._masked if self.decode else self._contiguous
        out = run(x, rows, experts)
        # the model's order: expert by expert, each output weighted in float32, rounded, added
        for e in range(self.num_local):
            sel = experts == e
            y.index_add_(0, rows[sel], (out[sel] * weights[rows[sel], slots[sel], None]).to(dtype))
        return y

    def _swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def _contiguous(self, x, rows, experts):
        """Prompt tokens: each expert's rows in one segment (m_grouped_fp8_gemm_nt_contiguous)."""
        k = self.kernels
        pos, m_indices = contiguous_rows(experts, self.num_local, pk.get_mk_alignment_for_contiguous_layout())
        m, dev = m_indices.numel(), x[0].device
        a = (torch.zeros(m, x[0].shape[1], dtype=x[0].dtype, device=dev),
             torch.ones(m, x[1].shape[1], dtype=torch.float32, device=dev))
        a[0][pos], a[1][pos] = x[0][rows], x[1][rows]
        h1 = k.empty(m, self.gate_up[0].shape[1], device=dev)
        pk.m_grouped_fp8_gemm_nt_contiguous(a, self.gate_up, h1, m_indices, backend=k.backend)
        act = torch.zeros(m, h1.shape[1] // 2, dtype=torch.bfloat16, device=dev)   # padding rows stay 0
        act[pos] = self._swiglu(h1[pos])
        h2 = k.empty(m, self.down[0].shape[1], device=dev)
        pk.m_grouped_fp8_gemm_nt_contiguous(k.quantize(act), self.down, h2, m_indices, backend=k.backend)
        return h2[pos]

    def _masked(self, x, rows, experts):
        """Decode tokens: a fixed capacity of N rows per expert, masked_m valid
        (m_grouped_fp8_gemm_nt_masked; CUDA-graph friendly: the shapes do not depend on routing)."""
        k = self.kernels
        g, cap, dev = self.num_local, x[0].shape[0], x[0].device
        counts = torch.bincount(experts, minlength=g)
        slot = rank_within_group(experts, counts)
        masked_m = counts.to(torch.int32)
        expected_m = max(1, math.ceil(experts.numel() / g))
        a = (torch.zeros(g, cap, x[0].shape[1], dtype=x[0].dtype, device=dev),
             torch.ones(g, cap, x[1].shape[1], dtype=torch.float32, device=dev))
        a[0][experts, slot], a[1][experts, slot] = x[0][rows], x[1][rows]
        h1 = k.empty(g, cap, self.gate_up[0].shape[1], device=dev)
        pk.m_grouped_fp8_gemm_nt_masked(a, self.gate_up, h1, masked_m, expected_m, backend=k.backend)
        act = torch.zeros(g, cap, h1.shape[2] // 2, dtype=torch.bfloat16, device=dev)
        act[experts, slot] = self._swiglu(h1[experts, slot])
        q, s = k.quantize(act)
        h2 = k.empty(g, cap, self.down[0].shape[1], device=dev)
        pk.m_grouped_fp8_gemm_nt_masked((q.view(act.shape), s.view(g, cap, -1)), self.down, h2, masked_m,
                                        expected_m, backend=k.backend)
        return h2[experts, slot]


class PagedLatentCache(DynamicCache):
    """The model's DynamicCache, plus a paged MLA cache per layer that its update also writes.

    The model calls update(kv_nope [b, 1, s, 512] (after kv_a_layernorm), k_rot [b, 1, s, 64]
    (after RoPE), layer). Each token's 576 values go to latent[layer] bf16
    [num_pages, 64, 1, 576] at page block_table[i, pos // 64], row pos % 64. The pages of a
    sequence are scattered (a random permutation), so a decode that ignores block_table fails;
    unwritten rows hold NaN when kernels.poison is set. Decode steps read only the pages."""

    def __init__(self, config, batch: int, max_tokens: int, kernels: Kernels, device="cpu", seed: int = 0):
        super().__init__(config=config)
        pages_per_seq = -(-max_tokens // PAGE)
        perm = torch.randperm(batch * pages_per_seq, generator=torch.Generator().manual_seed(seed))
        self.block_table = perm.view(batch, pages_per_seq).to(device=device, dtype=torch.int32)
        self.latent = [kernels.empty(batch * pages_per_seq, PAGE, 1, LATENT + ROPE, device=device)
                       for _ in range(config.num_hidden_layers)]
        self.kernels, self.max_tokens = kernels, max_tokens
        self._schedule = (None, None)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        start, b, s = self.get_seq_length(layer_idx), key_states.shape[0], key_states.shape[2]
        if start + s > self.max_tokens:
            raise ValueError(f"PagedLatentCache: {start + s} tokens exceed the {self.max_tokens} it was made for")
        pos = torch.arange(start, start + s, device=key_states.device)
        pages = self.block_table[:, pos // PAGE]                               # [b, s]
        rows = torch.cat([key_states, value_states], dim=-1)[:, 0]             # [b, s, 576]
        self.latent[layer_idx][pages, (pos % PAGE).expand(b, s), 0] = rows.to(torch.bfloat16)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def seqlens(self, layer_idx: int) -> torch.Tensor:
        b = self.block_table.shape[0]
        return torch.full((b,), self.get_seq_length(layer_idx), dtype=torch.int32, device=self.block_table.device)

    def schedule(self, seqlens: torch.Tensor, rows: int):
        """get_mla_metadata for this step's lengths: made once, shared by the layers."""
        key = (tuple(seqlens.tolist()), rows)
        if self._schedule[0] != key:
            self._schedule = (key, mla.get_mla_metadata(seqlens, rows, 1, self.kernels.mla_sm_parts))
        return self._schedule[1]


class PagedMLA(nn.Module):
    """Wraps DeepseekV3Attention. Decode steps (one token per sequence, with a
    PagedLatentCache) run MLA in its absorbed form: q_nope [h, d_nope] is projected into the
    latent space by W_UK (kv_b_proj's key rows), so q = [q_nope W_UK (512) | RoPE(q_rot) (64)]
    attends over the cached 576-wide rows, and the latent output [h, 512] is projected by
    W_UV (kv_b_proj's value rows) before o_proj. Anything else runs the model's attention."""

    def __init__(self, attn: nn.Module, kernels: Kernels):
        super().__init__()
        if attn.kv_lora_rank != LATENT or attn.qk_rope_head_dim != ROPE:
            raise ValueError(f"PagedMLA: FlashMLA's layout needs kv_lora_rank {LATENT} and qk_rope_head_dim {ROPE}, "
                             f"got {attn.kv_lora_rank} and {attn.qk_rope_head_dim}")
        self.attn, self.kernels = attn, kernels
        kv_b = attn.kv_b_proj
        w = kv_b.dequantized_weight() if isinstance(kv_b, Fp8Linear) else kv_b.weight.detach().float()
        w = w.view(attn.num_heads, attn.qk_nope_head_dim + attn.v_head_dim, LATENT)
        self.register_buffer("w_uk", w[:, :attn.qk_nope_head_dim].contiguous())   # float32 [h, d_nope, 512]
        self.register_buffer("w_uv", w[:, attn.qk_nope_head_dim:].contiguous())   # float32 [h, d_v, 512]
        self.rope = hf.apply_rotary_pos_emb_interleave if attn.config.rope_interleave else hf.apply_rotary_pos_emb

    def forward(self, hidden_states, position_embeddings, attention_mask, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if hidden_states.shape[1] != 1 or not isinstance(cache, PagedLatentCache):
            return self.attn(hidden_states, position_embeddings, attention_mask, **kwargs)
        a, b = self.attn, hidden_states.shape[0]
        q = a.q_b_proj(a.q_a_layernorm(a.q_a_proj(hidden_states))).view(b, 1, a.num_heads, a.qk_head_dim)
        q_nope, q_rot = q.split([a.qk_nope_head_dim, ROPE], dim=-1)
        kv_nope, k_rot = a.kv_a_proj_with_mqa(hidden_states).split([LATENT, ROPE], dim=-1)
        kv_nope = a.kv_a_layernorm(kv_nope)
        cos, sin = position_embeddings
        q_rot, k_rot = self.rope(q_rot.transpose(1, 2), k_rot.view(b, 1, 1, ROPE), cos, sin)
        cache.update(kv_nope.view(b, 1, 1, LATENT), k_rot, a.layer_idx)
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope.float(), self.w_uk)
        q_mla = torch.cat([q_latent, q_rot.transpose(1, 2).float()], dim=-1).to(torch.bfloat16)
        seqlens = cache.seqlens(a.layer_idx)
        meta, splits = cache.schedule(seqlens, a.num_heads)
        out = self.kernels.empty(b, 1, a.num_heads, LATENT, device=hidden_states.device)
        lse = self.kernels.empty(b, a.num_heads, 1, device=hidden_states.device, dtype=torch.float32)
        mla.flash_mla_with_kvcache(q_mla, cache.latent[a.layer_idx], cache.block_table, seqlens, LATENT, meta,
                                   splits, softmax_scale=a.scaling, causal=True, backend=self.kernels.backend,
                                   out=out, softmax_lse=lse)
        o = torch.einsum("bshc,hvc->bshv", out.float(), self.w_uv).to(hidden_states.dtype)
        return a.o_proj(o.reshape(b, 1, a.num_heads * a.v_head_dim)), None


def _mark_decode(moe: nn.Module, args):
    moe.experts.decode = args[0].shape[1] == 1     # [b, s, H]: a decode step feeds one token per sequence


PARTS = ("linear", "experts", "attention")


def substitute(model: nn.Module, kernels: Kernels, buffer=None, parts=PARTS) -> nn.Module:
    """Put `model` (a DeepseekV3ForCausalLM) on pykernels, in place; returns it. parts: which
    of PARTS to substitute (the others stay the model's own: a way to see what each costs)."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"parts: expected a subset of {PARTS}, got {sorted(unknown)}")
    for layer in model.model.layers:
        if "linear" in parts:
            linears = [(name, mod) for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)]
            for name, linear in linears:
                parent_name, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent_name), child, Fp8Linear(linear, kernels))
        if "attention" in parts:
            layer.self_attn = PagedMLA(layer.self_attn, kernels)
        if "experts" in parts and isinstance(layer.mlp, hf.DeepseekV3MoE):
            layer.mlp.experts = Fp8Experts(layer.mlp.experts, kernels, buffer)
            layer.mlp.register_forward_pre_hook(_mark_decode)
    return model
