"""The memory model (common/parallel) against measured bytes: weights of built models (float
and int8, tied and untied, LLaMA and GLM tiny presets), KV per token against the KV storage's
own allocation, and the arithmetic of parallel layouts, activations and KV capacity."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

from common.attention.backends import eager_attention, sdpa_attention
from common.attention.meta import ForwardContext
from common.core.errors import RecipeError
from common.io.checkpoint import from_seed
from common.kv.paged import PagedStorage
from common.kv.rows import make_rows
from common.kv.spec import KVSpec
from common.parallel.activations import activation_bytes, workspace_bytes
from common.parallel.capacity import kv_capacity
from common.parallel.layout import Layout, kv_heads_of_rank, stage_layers
from common.parallel.measured import decode_weight_bytes, weight_bytes
from common.parallel.memory import (
    device_memory,
    kv_bytes_per_token,
    parameter_count,
    weights_per_device,
)
from common.quant.scheme import get_scheme
from common.transforms.fusion import fuse_projections
from models.glm import GlmForCausalLM
from models.llama import LlamaForCausalLM

CONFIGS = Path(__file__).resolve().parents[1] / "configs/model"
FAMILIES = {"llama": (LlamaForCausalLM, "llama65b"), "glm": (GlmForCausalLM, "glm4_9b")}


def tiny_args(family: str, **changes):
    cls, config = FAMILIES[family]
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{config}.yaml"))
    return cls, cls.args_cls(**{**cfg["common"], **cfg["presets"]["tiny"], **changes})


CASES = {
    "llama": {},
    "llama-tied": {"tie_word_embeddings": True},
    "llama-biased": {"attention_bias": True, "mlp_bias": True},  # o_proj biased too
    "glm": {},  # q/k/v biased, o_proj not
    "glm-tied": {"tie_word_embeddings": True},
}


@pytest.mark.parametrize("scheme", ["none", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_weights_from_config_equal_built_model(case: str, dtype: torch.dtype, scheme: str) -> None:
    cls, args = tiny_args(case.split("-")[0], **CASES[case])
    model = from_seed(cls, args, 0, "cpu", dtype)
    if scheme == "int8":
        get_scheme(scheme).quantize(fuse_projections(model))  # stacking moves no bytes
    expected = weights_per_device(args, dtype, scheme)
    assert expected.total == weight_bytes(model)
    assert expected.decode_read == decode_weight_bytes(model)
    if scheme == "none" and dtype == torch.float32:
        assert parameter_count(args) == weight_bytes(model) // 4


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_kv_per_token_equals_storage(family: str, dtype: torch.dtype, int8: bool) -> None:
    _, args = tiny_args(family)
    layers, kv_heads, head_dim = args.num_hidden_layers, args.num_key_value_heads, args.kv_head_dim
    slots, cpu = 24, torch.device("cpu")
    rows = make_rows(KVSpec("contiguous", int8), layers, kv_heads, head_dim, 1, slots, dtype, cpu)
    assert kv_bytes_per_token(args, dtype, int8) == rows.nbytes() // slots
    # Paged storage of one tensor-parallel rank's KV heads (GLM: 2 heads, replicated at tp=4).
    for tp in (1, 2, 4):
        heads = kv_heads_of_rank(kv_heads, tp, tp - 1)
        pool = PagedStorage(layers, heads, head_dim, 4, 8, dtype, cpu, int8)
        assert kv_bytes_per_token(args, dtype, int8, Layout(tp=tp)) == pool.bytes_per_token


def test_tensor_parallel_splits_all_but_replicated_tensors() -> None:
    _, args = tiny_args("llama")  # 4 heads, 4 KV heads, 176 MLP channels, 256 vocab
    one, two = (
        weights_per_device(args, torch.float32),
        weights_per_device(args, torch.float32, layout=Layout(tp=2)),
    )
    # Every rank holds the norms whole: 2 per layer + the final one.
    replicated = 4 * args.hidden_size * (2 * args.num_hidden_layers + 1)
    assert 2 * two.total - replicated == one.total
    assert 2 * kv_bytes_per_token(args, torch.float32, layout=Layout(tp=2)) == kv_bytes_per_token(
        args, torch.float32
    )


def test_kv_heads_replicated_when_fewer_than_ranks() -> None:
    _, args = tiny_args("glm")  # 2 KV heads
    per_rank = [kv_bytes_per_token(args, torch.bfloat16, layout=Layout(tp=tp)) for tp in (1, 2, 4)]
    assert per_rank == [per_rank[0], per_rank[0] // 2, per_rank[0] // 2]
    assert [kv_heads_of_rank(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [kv_heads_of_rank(4, 2, r) for r in range(2)] == [(0, 2), (2, 4)]
    with pytest.raises(RecipeError, match="tp=3"):
        kv_bytes_per_token(args, torch.bfloat16, layout=Layout(tp=3))


def test_pipeline_stages_split_layers_embedding_first_head_last() -> None:
    assert stage_layers(10, 4) == (2, 3, 3, 2)
    _, args = tiny_args("llama", tie_word_embeddings=True)
    one = weights_per_device(args, torch.float32)
    first, last = (
        weights_per_device(args, torch.float32, layout=Layout(pp=2), stage=s) for s in (0, 1)
    )
    table = 4 * args.vocab_size * args.hidden_size
    assert (first.embedding, last.embedding) == (table, 0)
    # Tied across stages: the last stage holds its own copy of the table as the head.
    assert first.total + last.total == one.total + table
    assert first.decode_read == first.layers and last.decode_read == last.total
    kv = [kv_bytes_per_token(args, torch.float32, layout=Layout(pp=2), stage=s) for s in (0, 1)]
    assert sum(kv) == kv_bytes_per_token(args, torch.float32)
    with pytest.raises(RecipeError, match="pipeline stages"):
        weights_per_device(args, torch.float32, layout=Layout(pp=3))


def test_device_memory_breakdown() -> None:
    _, args = tiny_args("glm")
    stages = device_memory(
        args,
        torch.bfloat16,
        Layout(tp=2, pp=2),
        "int8",
        kv_int8=True,
        kv_tokens=1000,
        batch=4,
        seq_len=64,
    )
    assert [d.stage for d in stages] == [0, 1]
    for d in stages:
        assert d.total == d.weights.total + d.kv + d.activations + d.workspace
        assert d.kv == 1000 * kv_bytes_per_token(
            args, torch.bfloat16, True, Layout(tp=2, pp=2), d.stage
        )
    with pytest.raises(RecipeError, match="weight scheme"):
        device_memory(args, torch.bfloat16, scheme="int3")


def test_activation_and_workspace_formula() -> None:
    _, args = tiny_args("llama")  # hidden 64, 4 heads of 16, 4 KV heads, MLP 176, vocab 256
    assert activation_bytes(args, torch.bfloat16, 2, 32) == 2 * 2 * 32 * 64 * 2
    # Prefill of 2 x 32 tokens: eager scores [2, 4, 32, 32] in bf16 + fp32 + bf16 dominate.
    qkv = 2 * 64 * (4 + 2 * 4) * 16 * 2
    scores = 2 * 4 * 32 * 32 * (2 * 2 + 4)
    assert workspace_bytes(args, torch.bfloat16, 2, 32) == qkv + scores
    # Without materialized scores the MLP's four [64, 176] temporaries are the largest.
    assert workspace_bytes(args, torch.bfloat16, 2, 32, eager_attention=False) == 4 * 64 * 176 * 2
    # One decode token per row of a 32000-token vocab: the logits [2, 32000] in bf16 and fp32.
    big_vocab = dataclasses.replace(args, vocab_size=32000)
    assert workspace_bytes(big_vocab, torch.bfloat16, 2, 1, context=32) == 2 * 32000 * (2 + 4)
    with pytest.raises(RecipeError, match="batch >= 1"):
        activation_bytes(args, torch.bfloat16, 0, 1)


def _peak_live_bytes(fn) -> int:
    """The largest sum of live tensor bytes while fn runs, from the profiler's allocation
    events (an op's own allocations net of its frees, frees as [memory] events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("shape", [(2, 128), (4, 1)])  # a prefill; one token per row
@pytest.mark.parametrize("eager", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_activation_estimate_near_measured_peak(
    family: str, dtype: torch.dtype, eager: bool, shape: tuple[int, int]
) -> None:
    cls, args = tiny_args(family)
    model = from_seed(cls, args, 0, "cpu", dtype)
    batch, seq_len = shape
    ids = torch.randint(0, args.vocab_size, shape)
    positions = torch.arange(seq_len).expand(batch, seq_len)
    cache = make_rows(KVSpec("none"), 0, 0, 0, batch, seq_len, dtype, torch.device("cpu"))
    meta = cache.begin(positions, torch.ones_like(ids).bool())
    ctx = ForwardContext(cache, eager_attention if eager else sdpa_attention, meta)

    def forward() -> None:
        with torch.no_grad():
            model.logits(model(ids, positions, ctx)[:, -1]).float()

    estimate = activation_bytes(args, dtype, batch, seq_len) + workspace_bytes(
        args, dtype, batch, seq_len, eager_attention=eager
    )
    assert 0.8 < estimate / _peak_live_bytes(forward) < 1.25


def test_kv_capacity_default_budget_is_whole_blocks() -> None:
    # shared_prefix (issue 12): one 577-token sequence per batch ends mid-block. A budget of
    # 577 slots floored to 16-token blocks held none of it; the pool a paged cache allocates
    # for it (37 blocks) holds it, and contiguous storage of the same bytes holds one too.
    cap = kv_capacity([577, 560], 100, 16, batch=1)
    assert (cap.budget_bytes, cap.contiguous, cap.paged) == (37 * 16 * 100, 1, 1)
    # An explicit budget is what it is: paged counts whole blocks of it.
    cap = kv_capacity([577], 100, 16, batch=1, budget_bytes=577 * 100)
    assert (cap.contiguous, cap.paged) == (1, 0)
    # Many sequences: whole cycles of the lengths, then the order they arrive in.
    assert kv_capacity([16, 32], 1, 4, batch=1000, max_len=32).paged == 2 * 666 + 1  # 8000 blocks


def test_configs_are_checked() -> None:
    _, args = tiny_args("llama")
    with pytest.raises(RecipeError, match="tp >= 1"):
        Layout(tp=0)
    with pytest.raises(RecipeError, match="4 attention heads"):
        kv_bytes_per_token(args, torch.float32, layout=Layout(tp=8))
