"""Int4 group-wise weight-only: packing layout, every kernel against the reference math,
the modules, the scheme, and its weight bytes."""

import pytest
import torch
from torch import nn

from common import ops
from common.core.errors import RecipeError
from common.io.checkpoint import from_seed
from common.ops.int4_linear import dequant_mm, int4pack_mm, pack, unpack_rows
from common.parallel.measured import weight_bytes
from common.quant.int4 import (
    Int4Embedding,
    Int4Linear,
    Int4WeightOnly,
    fake_rtn,
    quantize_int4,
    quantize_rtn,
)
from models.llama import LlamaArgs, LlamaForCausalLM


@pytest.fixture
def own_choices(tmp_path):
    ops.reset(tmp_path / "choices.json")
    yield
    ops.reset()


def _reference(x: torch.Tensor, q: torch.Tensor, sz: torch.Tensor, g: int) -> torch.Tensor:
    """y = x @ ((q - 8) * scale + zero)ᵀ in float64, written out from the definition."""
    n, k = q.shape
    s = sz[..., 0].double().t().repeat_interleave(g, 1)[:, :k]  # [N, K]
    z = sz[..., 1].double().t().repeat_interleave(g, 1)[:, :k]
    return x.double() @ ((q.double() - 8) * s + z).t()


@pytest.mark.parametrize(("n", "k"), [(96, 256), (16, 64), (112, 576), (64, 32)])
def test_unpack_inverts_torch_packing(n: int, k: int) -> None:
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = pack(q)
    assert packed.shape == (n, k // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_rows(packed, torch.arange(n), k), q)
    rows = torch.tensor([n - 1, 0, n // 2, 5])
    assert torch.equal(unpack_rows(packed, rows, k), q[rows])


@pytest.mark.parametrize("impl", [int4pack_mm, dequant_mm])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_kernels_match_reference_math(impl, g: int, m: int) -> None:
    n, k = 80, 256
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    sz = torch.stack([torch.rand(k // g, n) * 0.1 + 0.01, torch.randn(k // g, n) * 0.1], -1)
    sz = sz.to(torch.bfloat16)
    x = torch.randn(m, k).to(torch.bfloat16)
    out = impl(x, pack(q), sz, g)
    ref = _reference(x, q, sz, g)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_rtn_error_is_within_half_a_step_and_tracks_float() -> None:
    w = torch.randn(48, 200)  # 200: the last group of 64 has 8 real columns
    w[3] = 0.0
    w[5, 7] = 30.0
    table = quantize_rtn(w, 64)
    assert table.packed.shape == (48, 256 // 2) and table.scales_and_zeros.shape == (4, 48, 2)
    deq = fake_rtn(w, 64)
    scale = table.scales_and_zeros[..., 0].t().repeat_interleave(64, 1)[:, :200]
    assert ((deq - w).abs() <= scale * 0.5 + 1e-6).all()
    linear = nn.Linear(200, 48)
    linear.weight.data.copy_(w)
    q = Int4Linear.from_linear(linear, table)
    x = torch.randn(2, 3, 200)
    ref = x @ deq.t() + linear.bias
    torch.testing.assert_close(q(x), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["int4pack_mm", "dequant_mm"])
def test_linear_module_under_each_pinned_kernel(impl: str, own_choices) -> None:
    ops.pin({"int4_linear": impl})
    linear = nn.Linear(192, 40, bias=True).to(torch.bfloat16)  # 40 rows: padded to 48
    q = Int4Linear.from_linear(linear, quantize_rtn(linear.weight, 64))
    x = torch.randn(5, 192).to(torch.bfloat16)
    ref = x.float() @ fake_rtn(linear.weight, 64).t() + linear.bias.float()
    out = q(x)
    assert out.shape == (5, 40)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
    assert any(f"{impl} (pinned)" in v for v in ops.chosen().values())


def _tiny(tie: bool = True, hidden: int = 64, bias: bool = False) -> LlamaForCausalLM:
    args = LlamaArgs(
        vocab_size=128, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie, attention_bias=bias,
    )  # fmt: skip
    return from_seed(LlamaForCausalLM, args, 0)


def test_scheme_shares_the_tied_table_and_stays_close_to_float() -> None:
    from common.attention.backends import get_backend  # noqa: F401  (the engine's path below)
    from common.device.select import select_device
    from common.engine.engine import Engine
    from common.kv.spec import KVSpec

    model = _tiny()
    device = select_device("cpu")
    ref = Engine(model, device, KVSpec("dynamic"), "sdpa").teacher_forced_logits([1, 5, 9], [7, 3])
    q = Int4WeightOnly(32).quantize(model)
    assert isinstance(q.lm_head, Int4Linear) and isinstance(q.model.embed_tokens, Int4Embedding)
    assert q.lm_head.weight_packed is q.model.embed_tokens.weight_packed
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in q.modules())
    out = Engine(q, device, KVSpec("dynamic"), "sdpa").teacher_forced_logits([1, 5, 9], [7, 3])
    assert ((out - ref).norm() / ref.norm()).item() < 0.2


def test_weight_bytes_at_most_030x_bf16_at_group_128() -> None:
    model = _tiny(hidden=256).to(torch.bfloat16)
    bf16 = weight_bytes(model)
    q = quantize_int4(model, 128)
    assert weight_bytes(q) <= 0.30 * bf16


def test_skip_keeps_modules_float() -> None:
    from common.quant.skip import skip_filter

    model = _tiny()
    skip = skip_filter(model, ["lm_head", "layers.0.mlp"])
    q = quantize_int4(model, 32, skip)
    assert isinstance(q.lm_head, nn.Linear) and isinstance(q.model.embed_tokens, nn.Embedding)
    assert isinstance(q.model.layers[0].mlp.up_proj, nn.Linear)
    assert isinstance(q.model.layers[0].self_attn.q_proj, Int4Linear)
    assert isinstance(q.model.layers[1].mlp.up_proj, Int4Linear)
    with pytest.raises(RecipeError, match=r"'layers\.9' names no quantizable module; e\.g\. "):
        skip_filter(model, ["layers.9"])


def test_invalid_group_size_is_a_clear_error() -> None:
    with pytest.raises(RecipeError, match="quant.group_size must be one of 32, 64, 128, got 48"):
        Int4WeightOnly(48)


@pytest.mark.parametrize("tie", [True, False])
def test_quantized_checkpoint_roundtrip(tmp_path, tie: bool) -> None:
    """int4 -> save (safetensors, machine-independent nibbles) -> load into a fresh float
    model -> the same outputs, bit for bit; a tied table is stored once and shared again."""
    from safetensors.torch import load_file, save_file

    from common.transforms.calibrate import _Causal

    scheme = Int4WeightOnly(32)
    src = scheme.quantize(_tiny(tie))
    state = scheme.state_dict(src)
    assert state["model.embed_tokens.qweight"].dtype == torch.uint8
    assert ("lm_head.qweight" in state) != tie  # tied: stored once
    save_file(state, tmp_path / "model.safetensors")
    dst = scheme.load_state_dict(
        _tiny(tie), load_file(tmp_path / "model.safetensors"), scheme.quantization_config()
    )
    assert (dst.lm_head.weight_packed is dst.model.embed_tokens.weight_packed) == tie
    ids = torch.randint(0, 128, (2, 6))
    pos = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        assert torch.equal(
            dst.logits(dst(ids, pos, _Causal())), src.logits(src(ids, pos, _Causal()))
        )
    with pytest.raises(RecipeError, match="is not the int4 scheme"):
        scheme.load_state_dict(_tiny(tie), state, {"scheme": "int8"})


def test_checkpoint_loads_onto_the_meta_model_with_biases_and_a_float_tied_head(tmp_path) -> None:
    """load_quantized builds on the meta device: every tensor is assigned, quantized linears
    keep their biases, and a tied head kept in float stays tied to its embedding; a table
    that does not fit its weight is a clear error."""
    from safetensors.torch import load_file, save_file

    from common.io.quantized import load_quantized, save_quantized
    from common.transforms.forwards import forwards

    src = _tiny(tie=True, bias=True)
    scheme = Int4WeightOnly(32)
    scheme.quantize(src, skip=lambda name, m: name in ("lm_head", "model.embed_tokens"))
    out = save_quantized(src, scheme, tmp_path / "q")
    dst = load_quantized(LlamaForCausalLM, out, "cpu", torch.float32)
    assert dst.model.layers[0].self_attn.q_proj.bias is not None
    assert dst.lm_head.weight is dst.model.embed_tokens.weight
    (run,) = forwards([torch.randint(0, 128, (1, 6))])
    assert torch.equal(run(dst), run(src))

    state = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.zeros"
    save_file({**state, name: state[name][:, :1].contiguous()}, out / "model.safetensors")
    with pytest.raises(RecipeError, match=rf"{name} \(64, 1\), expected \(64, 3\)"):
        load_quantized(LlamaForCausalLM, out, "cpu", torch.float32)
