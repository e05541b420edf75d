"""Multi-head latent attention (DeepSeek-V2/V3): keys and values come from one compressed latent per
token, and the cache keeps that latent and the shared rotary key, not the expanded K and V.

A token's cache entry is kv_lora_rank + qk_rope_head_dim values for all heads together (DeepSeek-V3:
576, against 2 x 128 heads x 192 = 49,152 for the expanded keys and values). A prompt chunk expands the
cached latents into per-head keys and values (kv_b_proj) and attends as usual. A decode step instead
folds kv_b_proj into the query and the output ("weight absorption"): the query moves into latent space,
attends over the cached entries directly as one key-value head shared by all heads (one matmul per
sequence with the heads as its rows, the cache read once), and the attended latent goes back through
the value half of kv_b_proj. Expanding every cached latent at every decode step would cost
as much as the cache saves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

from .kv_cache import KVCache
from .layers import MASKED_SDPA_BACKENDS, RMSNorm, rotate

# A prompt chunk's per-head keys and values of the whole cached context at most (out of the workspace).
EXPAND_BYTES = 256 << 20
# The low-rank projections' norms use this whatever rms_norm_eps says, as DeepSeek's code and transformers'.
LORA_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MLASpec:
    hidden_size: int
    num_heads: int
    q_lora_rank: int | None  # None: a plain q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    softmax_scale: float
    bias: bool = False  # on q_a_proj, kv_a_proj_with_mqa and o_proj
    interleaved_rope: bool = True  # rotary pairs are adjacent dimensions (x0, x1), (x2, x3), ...
    sliding_window: int | None = None  # never: kept for the cache's mask lookup

    def cache_shapes(self) -> tuple[tuple[int, int], ...]:
        """One tensor per token: the normalised latent and the rotated shared key, for all heads."""
        return ((1, self.kv_lora_rank + self.qk_rope_head_dim),)


class MLAttention(nn.Module):
    READ_WEIGHTS = ("kv_b_proj",)  # decode absorbs its weight into the query and output: kept a plain Linear

    def __init__(self, spec: MLASpec, layer_idx: int):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        s = spec
        qk = s.qk_nope_head_dim + s.qk_rope_head_dim
        if s.q_lora_rank is None:
            self.q_proj = nn.Linear(s.hidden_size, s.num_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(s.hidden_size, s.q_lora_rank, bias=s.bias)
            self.q_a_layernorm = RMSNorm(s.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = nn.Linear(s.q_lora_rank, s.num_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(s.hidden_size, s.kv_lora_rank + s.qk_rope_head_dim, bias=s.bias)
        self.kv_a_layernorm = RMSNorm(s.kv_lora_rank, LORA_NORM_EPS)
        self.kv_b_proj = nn.Linear(
            s.kv_lora_rank, s.num_heads * (s.qk_nope_head_dim + s.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(s.num_heads * s.v_head_dim, s.hidden_size, bias=s.bias)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.spec.interleaved_rope:  # pairs (x0, x1), ... -> halves (x0, x2, ...), (x1, x3, ...)
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        return rotate(x, cos, sin)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache
    ) -> torch.Tensor:
        s = self.spec
        b, t, _ = x.shape
        q = self.q_proj(x) if s.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, s.num_heads, -1).transpose(1, 2)  # [B, h, T, nope + rope]
        q_nope, q_rot = q.split([s.qk_nope_head_dim, s.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([s.kv_lora_rank, s.qk_rope_head_dim], dim=-1)
        cos, sin = (r[:, None] for r in rope)  # [B, 1, T, rope]
        q_rot, k_rot = self._rope(q_rot, cos, sin), self._rope(k_rot[:, None], cos, sin)
        entry = torch.cat((self.kv_a_layernorm(latent)[:, None], k_rot), dim=-1)  # [B, 1, T, rank + rope]
        (cached,) = cache.update(self.layer_idx, entry)  # [B, 1, L, rank + rope]
        mask = cache.mask(None)  # [B, 1, T, L]
        # [h, nope + v, rank]: per head, the key half and the value half of the latent's expansion
        w = self.kv_b_proj.weight.view(s.num_heads, -1, s.kv_lora_rank)
        w_k, w_v = w[:, : s.qk_nope_head_dim], w[:, s.qk_nope_head_dim :]
        with sdpa_kernel(MASKED_SDPA_BACKENDS):
            if t == 1:  # decode: attend in latent space (weight absorption), every head over the one cache
                query = torch.cat((torch.einsum("bhtn,hnr->bhtr", q_nope, w_k), q_rot), dim=-1)
                # [B, h, D] x [B, D, L] -> [B, h, L]: the heads are the rows of one matmul per sequence,
                # so the cache is read once and never copied per head
                scores = (
                    torch.matmul(query[:, :, 0].float(), cached[:, 0].transpose(1, 2).float())
                    * s.softmax_scale
                )
                probs = scores.masked_fill(~mask[:, :, 0], float("-inf")).softmax(dim=-1).to(cached.dtype)
                out = torch.matmul(probs, cached[:, 0, :, : s.kv_lora_rank])[:, :, None]  # [B, h, 1, rank]
                out = torch.einsum("bhtr,hvr->bhtv", out, w_v)  # [B, h, T, v]
            else:  # a prompt chunk: expand the cached latents into per-head keys and values
                out = self._expanded(torch.cat((q_nope, q_rot), dim=-1), cached, mask, w_k, w_v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _expanded(self, query, cached, mask, w_k, w_v) -> torch.Tensor:
        """Attention of a prompt chunk over the cached latents expanded per head, a group of heads at a
        time so that the expansion stays within EXPAND_BYTES (DeepSeek-V3 at 32K tokens: 3.8 GB for all
        128 heads at once). query [B, h, T, nope + rope] -> [B, h, T, v]."""
        s = self.spec
        latents, k_rots = cached.split([s.kv_lora_rank, s.qk_rope_head_dim], dim=-1)  # [B, 1, L, .]
        per_head = (
            cached.shape[0] * cached.shape[2] * (query.shape[-1] + s.v_head_dim) * cached.element_size()
        )
        group = max(1, EXPAND_BYTES // per_head)
        out = []
        for h in range(0, s.num_heads, group):
            heads = slice(h, h + group)
            k_nope = torch.einsum("bolr,hnr->bhln", latents, w_k[heads])  # [B, g, L, nope]
            values = torch.einsum("bolr,hvr->bhlv", latents, w_v[heads])  # [B, g, L, v]
            keys = torch.cat((k_nope, k_rots.expand(-1, k_nope.shape[1], -1, -1)), dim=-1)
            out.append(
                F.scaled_dot_product_attention(
                    query[:, heads], keys, values, attn_mask=mask, scale=s.softmax_scale
                )
            )
        return torch.cat(out, dim=1)
