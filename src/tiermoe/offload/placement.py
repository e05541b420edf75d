"""Choose the expert provider for a model: everything resident when the plan says it fits, else the
tiered store sized by the memory plan.

The memory plan is made in one place for everyone, from the module tree built on the meta device
(before any weight is allocated): `plan_for_model` for `LLM(...)`, and `plan_from_config` for
`tiermoe profile` and `tiermoe bench`, which have only config.json and must count the same slots the
engine will have."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from ..config import EngineConfig
from ..errors import InvalidRequestError
from ..formats.base import ExpertFormat
from ..formats.fp8 import Fp8BlockFormat
from ..formats.registry import format_for
from ..models.base import MoEArgs
from ..models.kv_cache import BLOCK_TOKENS, cache_slots
from ..models.layers import CausalLM
from ..models.registry import from_config
from .budget import GIB, BudgetError, MemoryPlan, plan_memory
from .in_place import refusal
from .policy import POLICIES
from .provider import ExpertProvider, load_resident
from .sources import open_expert_source
from .store import TieredExpertStore

log = logging.getLogger(__name__)

DEFAULT_KV_TOKENS = 4096  # KV cache reserve when --kv-reserve-tokens is not given (capped by the context)


def plan_from_config(hf_config: dict, config: EngineConfig) -> MemoryPlan:
    """The plan `LLM(path, **config)` makes, from the checkpoint's config.json alone (no weights read;
    an FP8 checkpoint's dense linears kept in FP8 are taken to be all the decoder layers')."""
    arch, hf, args = from_config(hf_config)
    fmt = format_for(hf_config, *args.expert_shape, config.torch_dtype, args.expert_kind)

    def build(fp8_dense: bool) -> CausalLM:
        with torch.device("meta"):
            model = arch.build(args, hf).to(dtype=config.torch_dtype)
        if fp8_dense:
            fmt.keep_linears(model, lambda name: True)
        return model

    return plan_dense(build, args, fmt, config, args.context_len(config.max_model_len))[1]


def plan_dense(
    build: Callable[[bool], CausalLM],
    args: MoEArgs,
    fmt: ExpertFormat,
    config: EngineConfig,
    max_model_len: int,
) -> tuple[CausalLM, MemoryPlan]:
    """The meta model that `build(fp8_dense)` makes and its plan. An FP8 checkpoint's dense linear layers
    stay FP8 where config.dense_weights says so: always (fp8), or only where dequantized ones would leave
    fewer than top-k expert slots a layer (auto: FP8 is half the bytes, but each forward dequantizes
    them again)."""
    fp8 = isinstance(fmt, Fp8BlockFormat)
    if config.dense_weights == "fp8" and not fp8:
        raise InvalidRequestError(
            f"dense_weights fp8 keeps an FP8 checkpoint's linear layers in FP8; this one's experts are {fmt.name}",
            "dense_weights",
        )
    model = build(config.dense_weights == "fp8")
    auto = config.dense_weights == "auto" and fp8
    try:
        plan = plan_for_model(model, args, fmt, config, max_model_len)
        if not auto or min(plan.quotas.values(), default=args.top_k) >= args.top_k:
            return model, plan
    except BudgetError:
        if not auto:
            raise
    model = build(True)
    plan = plan_for_model(model, args, fmt, config, max_model_len)
    log.info("dense linear layers kept in FP8: dequantized, they leave no top-k experts a layer on the GPU")
    return model, plan


def warn_below_top_k(plan: MemoryPlan, top_k: int) -> None:
    """Warn (at load) where the plan leaves a layer fewer GPU slots than top-k: a decode token's misses then
    come in several waves a layer and no slot stays hot (OLMoE at 4 GiB with 64 sequences' KV: 5.9 slots a
    layer, GPU hit 0.29 and half the tok/s of 8.6 slots; bench/NOTES.md section 37). Says what would give
    each layer top-k slots: the budget, or the KV reserve at this budget (whole blocks and the null block,
    as the plan counts them)."""
    least = min(plan.quotas.values(), default=top_k)
    if plan.all_resident or least >= top_k or plan.budget_bytes is None:
        return
    layers = len(plan.quotas)
    short = (layers * top_k - plan.gpu_slots) * plan.expert_bytes
    fix = (
        f"a --gpu-budget of {math.ceil((plan.budget_bytes + short) / GIB * 100) / 100:.2f} GiB"  # rounded up
    )
    if plan.kv_tokens:
        per_token = plan.kv_bytes // cache_slots(plan.kv_tokens)
        room = (
            plan.budget_bytes - plan.dense_bytes - plan.workspace_bytes - layers * top_k * plan.expert_bytes
        )
        tokens = (room // per_token // BLOCK_TOKENS - 1) * BLOCK_TOKENS  # the null block's room kept
        if tokens >= 1:
            fix += f", or --kv-reserve-tokens {tokens} (with fewer sequences at once)"
    log.warning(
        "the GPU budget leaves %d expert slots in some layers, fewer than top-k %d: a decode token's misses "
        "take several copy waves a layer and the hit rate falls; %s gives each layer top-k slots",
        least, top_k, fix,
    )  # fmt: skip


def plan_for_model(
    model: CausalLM, args: MoEArgs, fmt: ExpertFormat, config: EngineConfig, max_model_len: int
) -> MemoryPlan:
    """The plan for a model built on the meta device in the compute dtype: its dense parameters, each
    attention layer's KV bytes per token times the KV reserve, the workspace and the expert slots of
    the experts' format."""
    if config.eviction not in POLICIES:  # checked here, before any weight is loaded
        raise InvalidRequestError(
            f"eviction {config.eviction!r} unknown; choose one of {', '.join(POLICIES)}", "eviction"
        )
    dtype, device = config.torch_dtype, config.torch_device
    kv_tokens = config.kv_reserve_tokens or min(max_model_len, DEFAULT_KV_TOKENS)
    workspace = (
        config.workspace_gib if config.workspace_gib is not None else (1.0 if device.type == "cuda" else 0.0)
    )
    return plan_memory(
        moe_layers=args.moe_layers,
        num_experts=args.num_experts,
        top_k=args.top_k,
        expert_bytes=fmt.nbytes,
        dense_bytes=model.dense_bytes(),
        kv_bytes=cache_slots(kv_tokens) * model.kv_bytes_per_token(dtype.itemsize),
        workspace_bytes=int(workspace * GIB),
        device=device,
        gpu_budget_gib=config.gpu_budget_gib,
        cpu_budget_gib=config.cpu_budget_gib,
        kv_tokens=kv_tokens,
    )


def miss_path_for(config: EngineConfig, plan: MemoryPlan, source) -> str:
    """The miss path a store runs: config.miss_path, or for auto staged where it can run (bench/NOTES.md
    46: no host round trip per layer, and every miss admitted as the copy path admits it), copy elsewhere."""
    if config.miss_path != "auto":
        return config.miss_path
    staged = (
        source.device.type == "cuda"
        and not config.cpu_compute
        and refusal("staged", source.format, source.device, plan, source.args.num_experts) is None
    )
    return "staged" if staged else "copy"


def build_provider(source, config: EngineConfig, plan: MemoryPlan, progress=None) -> ExpertProvider:
    if plan.all_resident:
        return load_resident(source, progress)
    store = TieredExpertStore(
        open_expert_source(source),
        plan,
        source.format,
        source.args.num_experts,
        source.device,
        policy=config.eviction,
        prefetch=config.prefetch,
        progress=progress,
        miss_path=miss_path_for(config, plan, source),
        top_k=source.args.top_k,
    )
    if config.cpu_compute:
        store.cpu_costs = store.measure_cpu_costs(source.dtype)
    return store
