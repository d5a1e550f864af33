import pytest
import torch
from torch import nn

from common import ops
from common.nn.mlp import stack_linears
from common.ops.int8_linear import dequant_mm, int8pack_mm
from common.parallel.measured import weight_bytes
from common.quant.int8 import Int8Embedding, Int8WeightOnly, Int8WeightOnlyLinear, quantize_int8


@pytest.fixture
def own_choices(tmp_path):
    """Kernel choices and pins of this test only."""
    ops.reset(tmp_path / "choices.json")
    yield
    ops.reset()


@pytest.fixture
def pinned_int8pack(own_choices):
    """Every int8 linear whose rule allows it runs torch._weight_int8pack_mm."""
    ops.pin({"int8_linear": "int8pack_mm"})


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


class TiedLM(nn.Module):
    """Embedding -> nested MLP -> LM head whose weight is the embedding's (tied, as in HF)."""

    def __init__(self, vocab: int = 96, dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Sequential(
            nn.Linear(dim, 128), nn.GELU(), nn.Sequential(nn.Linear(128, dim, bias=False))
        )
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.body(self.embed(ids)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_roundtrip_error_within_half_a_step(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 80)
    weight[3] = 0.0  # all-zero row exercises the scale guard
    weight[5, 7] = 50.0  # outlier row: a coarse step, still bounded
    linear = nn.Linear(80, 48, bias=False).to(dtype)
    linear.weight.data.copy_(weight)
    q = Int8WeightOnlyLinear.from_linear(linear)

    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.shape == (48, 80)
    assert q.scales.shape == (48,) and q.scales.dtype == dtype
    assert torch.isfinite(q.scales).all() and (q.scales > 0).all()
    scales = q.scales.float()[:, None]
    err = (linear.weight.float() - q.weight_int8.float() * scales).abs()
    assert (err <= scales / 2 * (1 + 1e-5)).all()
    assert (q.weight_int8[3] == 0).all()
    # Each non-zero row's absmax lands on the edge of the int8 range, so no levels are wasted.
    assert (q.weight_int8.abs().amax(dim=1)[torch.arange(48) != 3] == 127).all()


@pytest.mark.parametrize("group", [32, 64])  # 80 columns: 64 + 16 makes a partial group
def test_group_scales_round_within_half_a_group_step(group: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(80, 48, bias=False)
    linear.weight.data[5, 7] = 50.0  # an outlier coarsens its own group only
    q = Int8WeightOnlyLinear.from_linear(linear, group_size=group)
    groups = -(-80 // group)
    assert q.scales.shape == (48, groups) and q.group_size == group
    per_input = q.scales.repeat_interleave(group, 1)[:, :80]
    err = (linear.weight - q.weight_int8.float() * per_input).abs()
    assert (err <= per_input / 2 * (1 + 1e-5)).all()
    for g in range(groups):  # every group's absmax lands on the edge of the int8 range
        assert (q.weight_int8[:, g * group : (g + 1) * group].abs().amax(dim=1) == 127).all()
    per_channel = Int8WeightOnlyLinear.from_linear(linear)
    assert q.scales[5].min() < per_channel.scales[5] / 10  # the outlier row's other groups
    x = torch.randn(3, 80)
    assert torch.allclose(q(x), x @ (q.weight_int8.float() * per_input).t(), atol=1e-4)


def test_group_scales_for_embeddings_and_the_tied_head() -> None:
    torch.manual_seed(0)
    model = TiedLM()
    embed_before = model.embed.weight.detach().clone()
    ids = torch.randint(0, 96, (2, 6))
    ref = model(ids).detach()
    quantize_int8(model, group_size=32)
    assert model.lm_head.weight_int8 is model.embed.weight_int8
    assert model.lm_head.scales is model.embed.scales and model.embed.scales.shape == (96, 2)
    step = model.embed.scales[ids].repeat_interleave(32, -1)
    assert bool(((model.embed(ids) - embed_before[ids]).abs() <= step / 2 + 1e-7).all())
    assert _rel_err(model(ids), ref) < 2e-2
    assert Int8WeightOnly(32).weight_format().matrix_bytes(96, 64, torch.float32) == (
        model.embed.weight_int8.nbytes + model.embed.scales.nbytes
    )


def test_group_scale_checkpoint_roundtrip_and_mismatch() -> None:
    from common.core.errors import RecipeError

    grouped, per_channel = Int8WeightOnly(32), Int8WeightOnly()
    torch.manual_seed(0)
    src = grouped.quantize(TiedLM())
    state, config = grouped.state_dict(src), grouped.quantization_config()
    assert config["granularity"] == "group" and config["group_size"] == 32
    assert per_channel.quantization_config()["granularity"] == "per_output_channel"
    dst = grouped.load_state_dict(TiedLM(), dict(state), config)
    ids = torch.randint(0, 96, (2, 6))
    assert torch.equal(dst(ids), src(ids))
    with pytest.raises(
        RecipeError,
        match=r"weight_scale \(96, 2\) for a \(96, 64\) weight \(one scale per output channel\)",
    ):
        per_channel.load_state_dict(TiedLM(), state, per_channel.quantization_config())
    with pytest.raises(RecipeError, match="quant.group_size must be one of 32, 64, 128, got 48"):
        Int8WeightOnly(48)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_features", [256, 40])  # 40: not a multiple of 16, takes the fallback
def test_linear_matches_float(dtype: torch.dtype, bias: bool, in_features: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 96, bias=bias).to(dtype)
    if bias:
        nn.init.normal_(linear.bias)  # default init is tiny; make a missing bias visible
    x = torch.randn(2, 5, in_features, dtype=dtype)
    out = Int8WeightOnlyLinear.from_linear(linear)(x)

    ref = nn.functional.linear(
        x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float()
    )
    assert out.shape == (2, 5, 96) and out.dtype == dtype
    assert _rel_err(out, ref) < 2e-2


def test_cpu_bf16_dispatch(monkeypatch: pytest.MonkeyPatch, pinned_int8pack) -> None:
    calls = []
    real = torch._weight_int8pack_mm

    def spy(*args: torch.Tensor) -> torch.Tensor:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(torch, "_weight_int8pack_mm", spy)
    q = Int8WeightOnlyLinear.from_linear(nn.Linear(64, 32).bfloat16())
    q(torch.randn(3, 64, dtype=torch.bfloat16))
    assert len(calls) == 1
    q(torch.randn(3, 64))  # fp32 activations: the kernel's fp32 path is a slow scalar loop
    q_odd = Int8WeightOnlyLinear.from_linear(nn.Linear(40, 32).bfloat16())
    q_odd(torch.randn(3, 40, dtype=torch.bfloat16))  # K % 16 != 0: the kernel reads garbage
    assert len(calls) == 1


def test_int8pack_and_dequant_paths_agree() -> None:
    torch.manual_seed(0)
    q = Int8WeightOnlyLinear.from_linear(nn.Linear(512, 320, bias=False).bfloat16())
    x = torch.randn(7, 512, dtype=torch.bfloat16)
    exact = x.float() @ (q.weight_int8.float() * q.scales.float()[:, None]).t()
    fast = int8pack_mm(x, q.weight_int8, q.scales)
    slow = dequant_mm(x, q.weight_int8, q.scales)
    assert fast.dtype == slow.dtype == torch.bfloat16
    # Both compute the same quantized product; they differ only by bf16 rounding.
    assert _rel_err(fast, exact) < 1e-2
    assert _rel_err(slow, exact) < 1e-2
    assert _rel_err(fast, slow) < 1e-2


def test_misaligned_and_strided_inputs(pinned_int8pack) -> None:
    torch.manual_seed(0)
    q = Int8WeightOnlyLinear.from_linear(nn.Linear(256, 64).bfloat16())
    big = torch.randn(3, 256 + 24, dtype=torch.bfloat16)
    row = big[:1, 8 : 8 + 256]  # contiguous, but starts 16 bytes into the buffer
    cols = big[:, 8 : 8 + 256]  # strided rows
    for x in (row, cols):
        assert torch.allclose(q(x), q(x.clone()), atol=0, rtol=0)


def test_quantize_replaces_linears_and_embeddings_sharing_the_tied_table() -> None:
    torch.manual_seed(0)
    model = TiedLM()
    embed_before = model.embed.weight.detach().clone()
    ids = torch.randint(0, 96, (2, 6))
    ref = model(ids).detach()

    assert quantize_int8(model) is model
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in model.modules())
    assert sum(isinstance(m, Int8WeightOnlyLinear) for m in model.modules()) == 3
    assert isinstance(model.embed, Int8Embedding)
    # The tied pair shares one int8 table and one set of scales.
    assert model.lm_head.weight_int8 is model.embed.weight_int8
    assert model.lm_head.scales is model.embed.scales
    rows = model.embed(ids)
    assert rows.dtype == torch.float32
    step = model.embed.scales[ids, None]
    assert bool(((rows - embed_before[ids]).abs() <= step / 2 + 1e-7).all())
    assert _rel_err(model(ids), ref) < 2e-2


def test_int8_embedding_bytes_and_decode_bytes() -> None:
    from common.parallel.measured import decode_weight_bytes

    untied = nn.Sequential(nn.Embedding(100, 32), nn.Linear(32, 100, bias=False)).bfloat16()
    quantize_int8(untied)
    table = 100 * 32 + 2 * 100  # int8 rows + one bf16 scale per row
    assert weight_bytes(untied) == 2 * table
    assert decode_weight_bytes(untied) == table  # decode reads one embedding row
    tied = quantize_int8(TiedLM().bfloat16())
    assert decode_weight_bytes(tied) == weight_bytes(tied)  # the head reads the whole table


def test_quantize_skip_keeps_tied_head() -> None:
    model = quantize_int8(TiedLM(), skip=lambda name, _: name in ("lm_head", "embed"))
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.embed.weight
    assert isinstance(model.body[0], Int8WeightOnlyLinear)


def test_quantize_shared_linear_replaced_everywhere() -> None:
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    quantize_int8(model)
    assert isinstance(model[0], Int8WeightOnlyLinear) and model[0] is model[2]


def test_weight_bytes() -> None:
    shapes = [(256, 512), (512, 256), (256, 1024)]
    model = nn.Sequential(*(nn.Linear(k, n, bias=False) for k, n in shapes)).bfloat16()
    before = weight_bytes(model)
    assert before == sum(2 * n * k for k, n in shapes)
    quantize_int8(model)
    # int8 weights + one bf16 scale per output channel.
    assert weight_bytes(model) == sum(n * k + 2 * n for k, n in shapes)
    assert 0.5 < weight_bytes(model) / before < 0.51


def test_weight_bytes_counts_tied_and_persistent_only() -> None:
    model = TiedLM(vocab=96, dim=64)
    model.register_buffer("pos", torch.zeros(10))
    model.register_buffer("cache", torch.zeros(1000), persistent=False)
    params = 96 * 64 + (64 * 128 + 128) + 128 * 64  # the tied head adds nothing
    assert weight_bytes(model) == 4 * (params + 10)


def test_state_dict_roundtrip() -> None:
    torch.manual_seed(0)
    src = quantize_int8(TiedLM().bfloat16())
    state = src.state_dict()
    assert state["lm_head.weight_int8"].dtype == torch.int8
    assert {"body.0.bias", "body.0.scales", "body.2.0.weight_int8"} <= state.keys()
    assert "body.2.0.bias" not in state

    torch.manual_seed(1)
    dst = quantize_int8(TiedLM().bfloat16())
    ids = torch.randint(0, 96, (2, 6))
    assert not torch.equal(dst(ids), src(ids))
    dst.load_state_dict(state)
    assert torch.equal(dst(ids), src(ids))


def test_quantize_releases_float_weights() -> None:
    """Nothing keeps the float weights alive, so peak memory is about the int8 model."""
    import gc
    import weakref

    model = TiedLM()
    refs = [weakref.ref(model.embed.weight), weakref.ref(model.body[0].weight)]
    quantize_int8(model)
    gc.collect()
    assert all(r() is None for r in refs)


@pytest.mark.parametrize(
    "impl, group",
    [("cpp_matvec", 0), ("int8pack_mm", 0), ("dequant_mm", 0), ("cpp_matvec", 32),
     ("dequant_mm", 32)],
)  # fmt: skip
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_stacking_rows_before_int8_changes_no_output(rows, impl, group, own_choices) -> None:
    """int8 of a stacked q/k/v matrix (scales per output channel or per group of its inputs)
    is the stack of each one's int8, so fusing projections (the int8 opt does) leaves every
    output bit unchanged under each kernel (the stacked matrix is larger, so the dispatch
    table may pick another one)."""
    ops.pin({"int8_linear": impl})
    q, k, v = (nn.Linear(64, n, bias=True).bfloat16() for n in (64, 32, 32))
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    fused = Int8WeightOnlyLinear.from_linear(stack_linears(q, k, v), group_size=group)(x)
    parts = [Int8WeightOnlyLinear.from_linear(m, group_size=group)(x) for m in (q, k, v)]
    assert set(ops.chosen().values()) == {f"{impl} (pinned)"}
    assert torch.equal(fused, torch.cat(parts, dim=-1))


def test_scheme_registry_names_the_choices() -> None:
    from common.core.errors import RecipeError
    from common.quant.scheme import SCHEMES, get_scheme

    assert get_scheme("int8") is SCHEMES["int8"]
    assert get_scheme("int8").kernels == ("int8_linear",)
    with pytest.raises(
        RecipeError,
        match="unknown quantization scheme 'int3'; choose none or int8, w8a8, int4, w4a8, gptq, awq",
    ):
        get_scheme("int3")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_checkpoint_roundtrip(tmp_path, dtype: torch.dtype) -> None:
    """quantize -> save (safetensors, HF-style names) -> load into a fresh float model -> the
    same outputs, bit for bit; the tied int8 table is stored once and shared again."""
    from safetensors.torch import load_file, save_file

    from common.quant.scheme import get_scheme

    scheme = get_scheme("int8")
    torch.manual_seed(0)
    src = scheme.quantize(TiedLM().to(dtype))
    state, config = scheme.state_dict(src), scheme.quantization_config()
    assert state["body.0.weight"].dtype == torch.int8 and "body.0.weight_scale" in state
    assert "body.0.bias" in state and "lm_head.weight" not in state  # tied to embed.weight
    save_file(state, tmp_path / "model.safetensors")

    torch.manual_seed(1)
    dst = scheme.load_state_dict(
        TiedLM().to(dtype), load_file(tmp_path / "model.safetensors"), config
    )
    assert dst.lm_head.weight_int8 is dst.embed.weight_int8
    ids = torch.randint(0, 96, (2, 6))
    assert torch.equal(dst(ids), src(ids))


def test_quantized_checkpoint_must_fit_the_model() -> None:
    from common.core.errors import RecipeError
    from common.quant.scheme import get_scheme

    scheme = get_scheme("int8")
    state = scheme.state_dict(scheme.quantize(TiedLM()))
    with pytest.raises(RecipeError, match="not the int8 scheme"):
        scheme.load_state_dict(TiedLM(), state, {"scheme": "int4"})
    del state["body.0.bias"]
    with pytest.raises(RecipeError, match=r"missing \['body.0.bias'\]"):
        scheme.load_state_dict(TiedLM(), state, scheme.quantization_config())
