"""Building blocks shared by every architecture: RMSNorm, rotary embedding, GQA attention, dense MLP,
the decoder layer and the decoder stack. Architecture files only choose and compose them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .kv_cache import BLOCK_TOKENS, KVCache

MASKED_SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
SINK_CHUNK_BYTES = 256 << 20  # float32 scores computed at once for the sinks' log-sum-exp


def fused_kernels(x: torch.Tensor, *weights: torch.Tensor):
    """models.fused where x takes its kernels (CUDA, nothing to differentiate: they have no backward),
    imported on first use: triton comes with torch's CUDA builds, not with every CPU install. None
    elsewhere: the torch ops."""
    if not x.is_cuda or (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights))):
        return None
    from . import fused

    return fused


class RMSNorm(nn.Module):
    float32_scale = False  # the weight multiplies after the cast back to x's dtype

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def add(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, this norm of it): the residual stream after a sublayer and the next one's input,
        in one launch on CUDA."""
        if (fused := fused_kernels(x, delta, self.weight)) and (
            both := fused.add_rms_norm(x, delta, self.weight, self.eps, self.float32_scale)
        ) is not None:
            return both
        total = x + delta
        return total, self(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused := fused_kernels(x, self.weight):
            return fused.rms_norm(x, self.weight, self.eps, self.float32_scale)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Float32ScaleRMSNorm(RMSNorm):
    """RMSNorm whose weight multiplies in float32, before the cast back (gpt-oss; transformers keeps these
    norms' weights in float32 where it can)."""

    FLOAT32_PARAMETERS = ("weight",)
    float32_scale = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused := fused_kernels(x, self.weight):
            return fused.rms_norm(x, self.weight, self.eps, self.float32_scale)
        h = x.float()
        return (self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding, rotate-half convention. `compute` returns (inv_freq [head_dim / 2],
    attention scaling) from the config's rope parameters, so scaled variants (yarn, linear, llama3) share
    this code. It is kept so the buffer can be rebuilt (`reset`) after the model was created on the meta
    device, and it always runs on the CPU, whatever device is ambient. Variants whose frequencies depend on
    the sequence length override `frequencies`."""

    def __init__(self, compute: Callable[[], tuple[torch.Tensor, float]]):
        super().__init__()
        self.compute = compute
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)
        self.reset()

    def reset(self) -> None:
        device = self.inv_freq.device
        with torch.device("cpu"):  # the model is built under torch.device("meta"): nothing to copy out of
            inv_freq, self.attention_scaling = self.compute()
        self.inv_freq = inv_freq.float().to("cpu" if device.type == "meta" else device)

    def frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        """The inverse frequencies for positions [B, T]: [D/2], or [B, 1, D/2] where they depend on the row."""
        return self.inv_freq

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.frequencies(positions)  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


class DynamicNTKRotary(Rotary):
    """transformers' "dynamic" NTK scaling. A row no longer than `original_len` (max_position_embeddings)
    tokens keeps the plain frequencies; a longer one, of length L = its largest position + 1, uses the base
    theta * (factor * L / original_len - (factor - 1)) ** (dim / (dim - 2)), recomputed at every forward
    as transformers does (keys already in the cache keep the frequencies they were rotated with). One
    difference: transformers takes L over the whole batch, this takes it per row, so a row's result does
    not depend on its batch; and a prompt prefilled in chunks gets each chunk's L."""

    def __init__(self, compute, theta: float, factor: float, original_len: int, dim: int):
        super().__init__(compute)
        self.theta, self.factor, self.original_len, self.dim = theta, factor, original_len, dim

    def frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        length = positions.amax(-1, keepdim=True) + 1  # [B, 1]
        stretch = self.factor * length.clamp(min=self.original_len) / self.original_len - (self.factor - 1)
        base = self.theta * stretch ** (self.dim / (self.dim - 2))  # [B, 1], float32 as in transformers
        steps = torch.arange(0, self.dim, 2, dtype=torch.int64, device=positions.device)
        grown = 1.0 / (base ** (steps.float() / self.dim))  # [B, D/2]
        return torch.where(length > self.original_len, grown, self.inv_freq)[:, None]


class LongRopeRotary(Rotary):
    """transformers' "longrope": `compute` returns the inverse frequencies of the short and of the long
    factors stacked [2, D/2]; a row longer than `original_len` tokens (its largest position + 1) uses the
    long ones. transformers decides over the whole batch, this per row."""

    def __init__(self, compute, original_len: int):
        super().__init__(compute)
        self.original_len = original_len

    def frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        long = positions.amax(-1) + 1 > self.original_len  # [B]
        return self.inv_freq[long.long()][:, None]  # [B, 1, D/2]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if (fused := fused_kernels(x)) and (out := fused.rotate(x, cos, sin)) is not None:
        return out
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class AttentionSpec:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None  # None, "head" (Qwen3: per head) or "full" (OLMoE: over all heads)
    clip_qkv: float | None = None
    sliding_window: int | None = None
    sinks: bool = False  # gpt-oss: a learned logit per head that takes its share of the softmax, no value

    def cache_shapes(self) -> tuple[tuple[int, int], ...]:
        """(heads, dim) of each tensor the layer caches per token: K and V."""
        return ((self.num_kv_heads, self.head_dim),) * 2


class Attention(nn.Module):
    def __init__(self, spec: AttentionSpec, layer_idx: int):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        s = spec
        self.q_proj = nn.Linear(s.hidden_size, s.num_heads * s.head_dim, bias=s.qkv_bias)
        self.k_proj = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=s.qkv_bias)
        self.v_proj = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=s.qkv_bias)
        self.o_proj = nn.Linear(s.num_heads * s.head_dim, s.hidden_size, bias=s.o_bias)
        self.sinks = nn.Parameter(torch.zeros(s.num_heads)) if s.sinks else None
        if s.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(s.head_dim, s.eps), RMSNorm(s.head_dim, s.eps)
        elif s.qk_norm == "full":
            self.q_norm = RMSNorm(s.num_heads * s.head_dim, s.eps)
            self.k_norm = RMSNorm(s.num_kv_heads * s.head_dim, s.eps)
        self.qkv: tuple[torch.Tensor, torch.Tensor | None, list[int]] | None = (
            None  # fuse_qkv's (weight, bias, rows)
        )

    def fuse_qkv(self) -> None:
        """Once the weights are loaded: q, k and v as one projection, a launch where there were three,
        with q_proj, k_proj and v_proj's weights left as views into it (no memory added). Linear layers of
        another kind (FP8) stay apart."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if any(type(p) is not nn.Linear for p in projections):
            return
        weight = torch.cat([p.weight for p in projections])
        bias = torch.cat([p.bias for p in projections]) if self.spec.qkv_bias else None
        at = 0
        for p in projections:
            rows = p.weight.shape[0]
            p.weight.data = weight[at : at + rows]
            if bias is not None:
                p.bias.data = bias[at : at + rows]
            at += rows
        self.qkv = (weight, bias, [p.weight.shape[0] for p in projections])

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, T, heads x D] of x [B, T, H]: views into one projection once fused."""
        if self.qkv is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        weight, bias, rows = self.qkv
        return F.linear(x, weight, bias).split(rows, dim=-1)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache
    ) -> torch.Tensor:
        s = self.spec
        b, t, _ = x.shape
        q, k, v = self.project(x)
        if t == 1 and (out := self._decode(q, k, v, rope, cache)) is not None:
            return self.o_proj(out)
        if s.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if s.clip_qkv is not None:
            q, k, v = (y.clamp(-s.clip_qkv, s.clip_qkv) for y in (q, k, v))
        q = q.view(b, t, s.num_heads, s.head_dim)
        k = k.view(b, t, s.num_kv_heads, s.head_dim)
        if s.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, heads, T, D]
        v = v.view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        cos, sin = (r[:, None] for r in rope)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k, v = cache.update(self.layer_idx, k, v)  # [B, kv_heads, L, D] over the whole cache so far
        mask = cache.mask(s.sliding_window)  # [B, 1, T, L] bool
        out = self._with_sinks(q, k, v, mask) if s.sinks else self._sdpa(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _decode(self, q, k, v, rope, cache: KVCache) -> torch.Tensor | None:
        """One token a row on CUDA, from the projections q, k, v [B, 1, heads x D]: norms, rotations and the
        cache writes in one launch, attention through the block tables in one or two (models.fused);
        [B, 1, heads x D], or None where the kernels do not apply (nothing done then)."""
        s = self.spec
        fused = fused_kernels(q)
        cos, sin = rope
        pools = cache.parts[self.layer_idx]
        if not fused or s.clip_qkv is not None or not fused.rope_into_cache_fits(q, k, v, cos, sin, pools):
            return None
        norms, float32_scale = None, False
        if s.qk_norm is not None:  # the norms keep the dtype (as the kernel does), or the torch path runs
            weights = (self.q_norm.weight, self.k_norm.weight)
            float32_scale = self.q_norm.float32_scale
            if not float32_scale and any(torch.promote_types(w.dtype, q.dtype) != q.dtype for w in weights):
                return None
            if s.qk_norm == "head":
                norms = weights
            else:  # over all heads: its own kernel first
                q, k = self.q_norm(q), self.k_norm(k)
        batch = cache.batch
        k_pool, v_pool = pools
        q = fused.rope_into_cache(
            q,
            k,
            v,
            cos,
            sin,
            batch.slots,
            k_pool,
            v_pool,
            norms,
            self.q_norm.eps if norms else 0.0,
            float32_scale,
        )  # [B, H, 1, D]
        return fused.decode_attention(
            q, k_pool, v_pool, batch.tables, batch.positions, batch.lengths, BLOCK_TOKENS,
            s.sliding_window, self.sinks if s.sinks else None,
        )  # fmt: skip

    def _sdpa(self, q, k, v, mask) -> torch.Tensor:
        # cuDNN's SDPA rebuilds its execution plan for every new key length (4 ms of CPU per decode step
        # measured on an H100); the memory-efficient kernel takes our mask at no such cost, but not with
        # enable_gqa: a mask and enable_gqa send SDPA to its math path, whose float32 scores [B, H, T, L]
        # are 1 GiB for a 2,048-token prompt chunk of Qwen3-30B-A3B against 4,096 keys (bench/NOTES.md 51).
        # So each key head is repeated for its group (32 MiB there) and the kernel sees plain heads.
        group = self.spec.num_heads // self.spec.num_kv_heads
        if group > 1:
            k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))  # [B, H, L, D], as enable_gqa pairs
        with sdpa_kernel(MASKED_SDPA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def _with_sinks(self, q, k, v, mask) -> torch.Tensor:
        """Attention whose softmax has one more logit per head, its sink, with no value: p_i = exp(s_i) /
        (sum_j exp(s_j) + exp(sink)). SDPA has no such term; its output times the share the keys keep,
        sigmoid(logsumexp(s) - sink), is the same, with the log-sum-exp computed here in float32 over
        query chunks of at most SINK_CHUNK_BYTES of scores. q [B, H, T, D]; k, v [B, KV, L, D]."""
        b, h, t, d = q.shape
        kv = k.shape[1]
        out = self._sdpa(q, k, v, mask)
        grouped = q.view(b, kv, h // kv, t, d)  # query heads sharing a key head, as enable_gqa pairs them
        rows = max(1, SINK_CHUNK_BYTES // (4 * h * k.shape[2] * b))
        lse = torch.cat([
            (
                torch.einsum("bgqtd,bgld->bgqtl", grouped[:, :, :, i : i + rows].float(), k.float())
                * d**-0.5
            ).masked_fill(~mask[:, :, None, i : i + rows], float("-inf")).logsumexp(-1)
            for i in range(0, t, rows)
        ], dim=-1).view(b, h, t)  # fmt: skip
        keep = torch.sigmoid(lse - self.sinks.float()[:, None])  # [B, H, T]
        return (out.float() * keep[..., None]).to(out.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(
        self, attn: Attention, mlp: nn.Module, hidden_size: int, eps: float, norm: type[RMSNorm] = RMSNorm
    ):
        super().__init__()
        self.self_attn, self.mlp = attn, mlp
        self.input_layernorm = norm(hidden_size, eps)
        self.post_attention_layernorm = norm(hidden_size, eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache
    ) -> torch.Tensor:
        x, normed = self.attend(x, rope, cache)
        return x + self.mlp(normed)

    def attend(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
        delta: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream after this layer's attention, and its post-attention norm (the MLP's input).
        delta: the previous layer's MLP output not yet added to x, added here in the input norm's launch."""
        if delta is None:
            normed = self.input_layernorm(x)
        else:
            x, normed = self.input_layernorm.add(x, delta)
        return self.post_attention_layernorm.add(x, self.self_attn(normed, rope, cache))

    # A MoE layer in two parts, for callers that run the routed experts themselves (the runner's
    # layered CUDA graphs): forward(x) == after_experts(r, experts(xn, ids, w), s) of before_experts(x).
    def before_experts(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache):
        """(residual after attention [B, T, H], expert input [T, H], routing weights and expert ids
        [T, k], shared expert output [T, H] or None)."""
        x1, xn = self.attend(x, rope, cache)
        xn = xn.reshape(-1, x1.shape[-1])
        return (x1, xn, *self.mlp.dense_part(xn))

    def after_experts(
        self, residual: torch.Tensor, routed: torch.Tensor, shared: torch.Tensor | None, out=None
    ) -> torch.Tensor:
        """The layer's output from the routed experts' output [T, H], written into `out` if given."""
        return torch.add(residual, self.mlp.combine(routed, shared).view_as(residual), out=out)


class DecoderBody(nn.Module):
    """Embedding, decoder layers and final norm; the `model.` prefix of Hugging Face names."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        layers: list[DecoderLayer],
        eps: float,
        rotary: Rotary,
        norm: type[RMSNorm] = RMSNorm,
    ):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = norm(hidden_size, eps)
        self.rotary = rotary


class CausalLM(nn.Module):
    """The full model: `model` (DecoderBody) and `lm_head`, named as in Hugging Face checkpoints."""

    def __init__(self, body: DecoderBody, vocab_size: int, hidden_size: int, tie_word_embeddings: bool):
        super().__init__()
        self.model = body
        self.lm_head = None if tie_word_embeddings else nn.Linear(hidden_size, vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [B, T]; logits_at [B]: the index in each row (rows are right-padded)
        whose logits are returned, [B, V]; None: every position's, [B, T, V]."""
        x, rope = self.embed(input_ids, positions)
        delta = None
        for layer in self.model.layers:  # each MLP's output added in the next layer's input norm
            x, normed = layer.attend(x, rope, cache, delta)
            delta = layer.mlp(normed)
        x = x + delta
        if logits_at is not None:
            x = x.gather(1, logits_at[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0]
        return self.head(x)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor):
        """Token embeddings [B, T, H] and the rotary (cos, sin) tables of the positions."""
        x = self.model.embed_tokens(input_ids)
        return x, self.model.rotary(positions, x.dtype)

    def dense_bytes(self) -> int:
        """Bytes of every parameter this module tree holds (the experts live in their provider); on the
        meta device too, so the plan is made before any weight is allocated."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def cache_shapes(self) -> list[tuple[tuple[int, int], ...]]:
        """Per layer, (heads, dim) of each tensor its attention caches per token."""
        return [layer.self_attn.spec.cache_shapes() for layer in self.model.layers]

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """KV cache bytes per token over all layers, as each attention layer declares them."""
        return sum(h * d * itemsize for shapes in self.cache_shapes() for h, d in shapes)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: float32 logits."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.model.norm(x), weight).float()
