"""Tensor names and shapes of a Hugging Face MoE checkpoint, computed from its config.json alone.

One declarative row per architecture says how it names things; `tensor_specs` walks the layers and
yields exactly the tensors `save_pretrained` writes (per-expert Hub names), so synth can write a
checkpoint layer by layer and the bench can count expert bytes without opening the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedArchitectureError

BYTES_PER_DTYPE = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1}


@dataclass(frozen=True)
class ArchLayout:
    """How one architecture names its tensors on disk."""

    moe_module: str  # "mlp" or "block_sparse_moe"
    expert_names: tuple[str, str, str]  # (gate, up, down) projections of one expert
    qk_norm: str | None  # None, "head" (one norm of head_dim), "full" (over all heads)
    attn_bias: str  # config field that turns on q/k/v(/o) biases, "" for none
    bias_on_o_proj: bool
    shared_expert: bool


LAYOUTS: dict[str, ArchLayout] = {
    "Qwen3MoeForCausalLM": ArchLayout(
        "mlp", ("gate_proj", "up_proj", "down_proj"), "head", "attention_bias", True, False
    ),
    "Qwen2MoeForCausalLM": ArchLayout(
        "mlp", ("gate_proj", "up_proj", "down_proj"), None, "qkv_bias", False, True
    ),
    "OlmoeForCausalLM": ArchLayout(
        "mlp", ("gate_proj", "up_proj", "down_proj"), "full", "attention_bias", True, False
    ),
    "MixtralForCausalLM": ArchLayout("block_sparse_moe", ("w1", "w3", "w2"), None, "", False, False),
}

# Fields whose default differs from "off" when a config omits them (transformers' defaults).
_BIAS_DEFAULTS = {"qkv_bias": True}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the checkpoint. init: "normal" (weights), "ones" (norms) or "zeros" (biases)."""

    name: str
    shape: tuple[int, ...]
    init: str
    is_expert: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def architecture(config: dict) -> str:
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in LAYOUTS:
            return arch
    raise UnsupportedArchitectureError(
        f"architectures {archs} is not one of the MoE layouts tiermoe knows: {', '.join(sorted(LAYOUTS))}"
    )


def num_experts(config: dict) -> int:
    """Routed experts per MoE layer; writers disagree on the field name, so accept all three."""
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if config.get(key):
            return int(config[key])
    raise UnsupportedArchitectureError("config.json names no expert count (num_experts / num_local_experts)")


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def expert_intermediate_size(config: dict) -> int:
    # Mixtral's experts use intermediate_size; Qwen-style configs keep a separate dense size.
    return int(config.get("moe_intermediate_size") or config["intermediate_size"])


def moe_layer_indices(config: dict) -> list[int]:
    """Layers with a sparse MoE block (the rest carry a dense MLP), as transformers decides it."""
    only_mlp = set(config.get("mlp_only_layers") or [])
    step = int(config.get("decoder_sparse_step") or 1)
    first_dense = int(config.get("first_k_dense_replace") or 0)
    return [
        i
        for i in range(config["num_hidden_layers"])
        if i not in only_mlp and (i + 1) % step == 0 and i >= first_dense
    ]


def bytes_per_element(config: dict) -> int:
    dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    return BYTES_PER_DTYPE[str(dtype).removeprefix("torch.")]


def _attention_specs(config: dict, layout: ArchLayout, prefix: str) -> list[TensorSpec]:
    hidden, hd = config["hidden_size"], head_dim(config)
    q_out, kv_out = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    bias = (
        bool(config.get(layout.attn_bias, _BIAS_DEFAULTS.get(layout.attn_bias, False)))
        if layout.attn_bias
        else False
    )
    specs = []
    for proj, out_dim in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
        specs.append(TensorSpec(f"{prefix}.{proj}.weight", (out_dim, hidden), "normal"))
        if bias:
            specs.append(TensorSpec(f"{prefix}.{proj}.bias", (out_dim,), "zeros"))
    specs.append(TensorSpec(f"{prefix}.o_proj.weight", (hidden, q_out), "normal"))
    if bias and layout.bias_on_o_proj:
        specs.append(TensorSpec(f"{prefix}.o_proj.bias", (hidden,), "zeros"))
    if layout.qk_norm == "head":
        specs += [
            TensorSpec(f"{prefix}.q_norm.weight", (hd,), "ones"),
            TensorSpec(f"{prefix}.k_norm.weight", (hd,), "ones"),
        ]
    elif layout.qk_norm == "full":
        specs += [
            TensorSpec(f"{prefix}.q_norm.weight", (q_out,), "ones"),
            TensorSpec(f"{prefix}.k_norm.weight", (kv_out,), "ones"),
        ]
    return specs


def _mlp_specs(
    prefix: str, hidden: int, inter: int, names: tuple[str, str, str], is_expert: bool
) -> list[TensorSpec]:
    gate, up, down = names
    return [
        TensorSpec(f"{prefix}.{gate}.weight", (inter, hidden), "normal", is_expert),
        TensorSpec(f"{prefix}.{up}.weight", (inter, hidden), "normal", is_expert),
        TensorSpec(f"{prefix}.{down}.weight", (hidden, inter), "normal", is_expert),
    ]


def layer_specs(config: dict, layer: int) -> list[TensorSpec]:
    """Every tensor of decoder layer `layer`, in a stable order."""
    layout = LAYOUTS[architecture(config)]
    hidden = config["hidden_size"]
    prefix = f"model.layers.{layer}"
    specs = [
        TensorSpec(f"{prefix}.input_layernorm.weight", (hidden,), "ones"),
        *_attention_specs(config, layout, f"{prefix}.self_attn"),
        TensorSpec(f"{prefix}.post_attention_layernorm.weight", (hidden,), "ones"),
    ]
    dense_names = ("gate_proj", "up_proj", "down_proj")
    if layer not in moe_layer_indices(config):
        return specs + _mlp_specs(f"{prefix}.mlp", hidden, config["intermediate_size"], dense_names, False)
    moe = f"{prefix}.{layout.moe_module}"
    n_exp, inter = num_experts(config), expert_intermediate_size(config)
    specs.append(TensorSpec(f"{moe}.gate.weight", (n_exp, hidden), "normal"))
    for e in range(n_exp):
        specs += _mlp_specs(f"{moe}.experts.{e}", hidden, inter, layout.expert_names, True)
    if layout.shared_expert:
        shared = config["shared_expert_intermediate_size"]
        specs += _mlp_specs(f"{moe}.shared_expert", hidden, shared, dense_names, False)
        specs.append(TensorSpec(f"{moe}.shared_expert_gate.weight", (1, hidden), "normal"))
    return specs


def tensor_specs(config: dict) -> list[TensorSpec]:
    """Every tensor of the checkpoint: embeddings, the layers in order, final norm, lm_head."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, hidden), "normal")]
    for layer in range(config["num_hidden_layers"]):
        specs += layer_specs(config, layer)
    specs.append(TensorSpec("model.norm.weight", (hidden,), "ones"))
    if not config.get("tie_word_embeddings", False):
        specs.append(TensorSpec("lm_head.weight", (vocab, hidden), "normal"))
    return specs


@dataclass(frozen=True)
class CheckpointSize:
    """Bytes of a checkpoint split into routed experts (offloadable) and everything else (resident)."""

    expert_bytes: int
    dense_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.expert_bytes + self.dense_bytes


def checkpoint_size(config: dict) -> CheckpointSize:
    per = bytes_per_element(config)
    expert = dense = 0
    for spec in tensor_specs(config):
        if spec.is_expert:
            expert += spec.numel * per
        else:
            dense += spec.numel * per
    return CheckpointSize(expert, dense)


def expert_bytes_per_token(config: dict) -> int:
    """Bytes of routed-expert weights one token reads: top-k experts × MoE layers × 3 matrices."""
    per_expert = 3 * config["hidden_size"] * expert_intermediate_size(config) * bytes_per_element(config)
    return int(config["num_experts_per_tok"]) * len(moe_layer_indices(config)) * per_expert
