"""Choose the expert provider for a model: everything resident when the plan says it fits, else the
tiered store sized by the memory plan."""

from __future__ import annotations

from ..config import EngineConfig
from .budget import GIB, MemoryPlan, plan_memory
from .provider import ExpertProvider, load_resident
from .sources import open_expert_source
from .store import TieredExpertStore


def memory_plan(source, config: EngineConfig, dense_bytes: int, max_model_len: int) -> MemoryPlan:
    args = source.args
    itemsize = source.dtype.itemsize
    kv_tokens = config.kv_reserve_tokens or min(max_model_len, 4096)
    kv_bytes = kv_tokens * args.num_layers * 2 * args.num_kv_heads * args.head_dim * itemsize
    workspace = (
        config.workspace_gib
        if config.workspace_gib is not None
        else (1.0 if source.device.type == "cuda" else 0.0)
    )
    return plan_memory(
        moe_layers=args.moe_layers,
        num_experts=args.num_experts,
        top_k=args.top_k,
        expert_bytes=args.expert_numel() * itemsize,
        dense_bytes=dense_bytes,
        kv_bytes=kv_bytes,
        workspace_bytes=int(workspace * GIB),
        device=source.device,
        gpu_budget_gib=config.gpu_budget_gib,
        cpu_budget_gib=config.cpu_budget_gib,
    )


def build_provider(source, config: EngineConfig, plan: MemoryPlan, progress=None) -> ExpertProvider:
    if plan.all_resident:
        return load_resident(source, progress)
    return TieredExpertStore(
        open_expert_source(source),
        plan,
        source.args.expert_shape,
        source.args.num_experts,
        source.dtype,
        source.device,
        policy=config.eviction,
        prefetch=config.prefetch,
        progress=progress,
    )
