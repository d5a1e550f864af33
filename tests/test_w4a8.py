"""W4A8: the int4 x int8 kernel against the reference math, and the scheme on the tiny LLaMA."""

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from common import ops
from common.core.errors import RecipeError
from common.io.checkpoint import from_seed
from common.ops.library import loads, registered
from common.ops.w4a8_linear import pack, reference, unpack, w4a8_linear, w4a8_vnni
from common.ops.w8a8_linear import quantize_rows
from common.quant.int4 import Int4Embedding, Int4Linear, Int4WeightOnly
from common.quant.scheme import configured_scheme
from common.quant.w4a8 import W4A8, W4A8Linear
from common.transforms.forwards import forwards
from common.transforms.registry import apply_transforms
from models.llama import LlamaForCausalLM
from tests.tiny import TINY_LLAMA, random_batches, recipe_config

needs_vnni = pytest.mark.skipif(not loads("int4_vnni"), reason="this CPU has no AVX512-VNNI")
ROWS = [1, 3, 8, 17]  # one row, a register-block tail, a full block, blocks and a tail
KS = [64, 80, 100, 576, 1000]  # chunks of 64 and tails; K % g == 0 and not, for each g
GROUPS = [32, 64, 128]


def _case(m: int, k: int, n: int, g: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    x[:, 3] *= 20  # an outlier channel: most of a row rounds to few levels
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    groups = -(-k // g)
    scales = (torch.rand(n, groups, generator=gen) / 50 + 1e-3).to(dtype)
    zeros = (torch.randn(n, groups, generator=gen) / 20).to(dtype)
    return x, q, scales, zeros


def _exact(x, q, scales, zeros, g):
    """The definition in float64: quantized rows times W = (q - 8) * s + z, scaled per row;
    and the sum of the terms' magnitudes, what float rounding is relative to."""
    xq, sx = quantize_rows(x)
    k = q.shape[1]
    s, z = (t.double().repeat_interleave(g, 1)[:, :k] for t in (scales, zeros))
    w = (q.double() - 8) * s + z
    scale = sx.double()[:, None]
    return (xq.double() @ w.t()) * scale, (xq.double().abs() @ w.abs().t()) * scale


@pytest.mark.parametrize("n", [16, 37])
def test_pack_roundtrip_and_layout(n):
    q = torch.randint(0, 16, (n, 100), dtype=torch.uint8)
    packed = pack(q)
    assert packed.shape == (n, 64) and packed.dtype == torch.uint8  # 2 chunks of 32 bytes
    assert torch.equal(unpack(packed, 100), q)
    assert torch.equal(packed[:, 1] & 15, q[:, 1]) and torch.equal(packed[:, 1] >> 4, q[:, 33])
    assert torch.equal(packed[:, 32 + 3] >> 4, q[:, 64 + 32 + 3])  # chunk 1
    assert torch.equal(packed[:, 32 + 4] >> 4, torch.full((n,), 8, dtype=torch.uint8))  # pad


@pytest.mark.parametrize("impl", ["reference", "vnni"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_equal_the_definition_to_float_rounding(impl, dtype):
    """Every rows count, chunk tail and group size. fp32: within a few fp32 roundings of the
    terms' magnitudes (the integer dots are exact; only the float sums round). bf16: the same
    before the output's rounding, so at most one bf16 step apart (2^-8 relative)."""
    if impl == "vnni" and not loads("int4_vnni"):
        pytest.skip("this CPU has no AVX512-VNNI")
    fn = {"reference": reference, "vnni": w4a8_vnni}[impl]
    for g in GROUPS:
        for k in KS:
            for m in ROWS:
                x, q, s, z = _case(m, k, 19, g, dtype)
                out = fn(x, pack(q), s, z, g)
                assert out.dtype == dtype and out.shape == (m, 19)
                exact, size = _exact(x, q, s, z, g)
                err = (out.double() - exact).abs()
                bound = size * 1e-6 + (exact.abs() * 2**-8 if dtype == torch.bfloat16 else 0)
                assert (err <= bound).all(), (impl, g, k, m, (err / size).max().item())


@needs_vnni
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vnni_agrees_with_the_reference(dtype):
    """Same quantized rows and integer dots: the two differ only in the order of float sums."""
    for g in GROUPS:
        for k in (100, 576):
            for m in ROWS:
                x, q, s, z = _case(m, k, 37, g, dtype, seed=1)
                a, b = w4a8_vnni(x, pack(q), s, z, g), reference(x, pack(q), s, z, g)
                if dtype == torch.float32:
                    _, size = _exact(x, q, s, z, g)
                    assert ((a - b).double().abs() <= size * 1e-6).all(), (g, k, m)
                else:  # at most one bf16 rounding step apart
                    assert ((a.float() - b.float()).abs() <= b.float().abs() * 2**-7).all()


@needs_vnni
def test_vnni_integer_dot_is_exact():
    """With s = 1 and z = 8 (W = q) and integer x whose row max is 127 (sx = 1, xq = x), the
    output is the integer product itself, over every group size and chunk tail."""
    for k in (64, 100, 4096):
        for m in (1, 5, 9):
            for g in GROUPS:
                q = torch.randint(0, 16, (23, k), dtype=torch.uint8)
                x = torch.randint(-127, 128, (m, k)).float()
                x[:, 0] = 127
                groups = -(-k // g)
                out = w4a8_vnni(
                    x, pack(q), torch.ones(23, groups), torch.full((23, groups), 8.0), g
                )
                assert torch.equal(out, (x.double() @ q.double().t()).float()), (k, m, g)


@pytest.mark.parametrize("impl", ["reference", "vnni"])
def test_bad_shapes_are_a_clear_error(impl):
    if impl == "vnni" and not loads("int4_vnni"):
        pytest.skip("this CPU has no AVX512-VNNI")
    fn = {"reference": reference, "vnni": w4a8_vnni}[impl]
    x, q, s, z = _case(2, 100, 8, 32, torch.float32)
    w = pack(q)
    bad = [
        (x, w, s, z, 48),  # a group size the layout cannot take
        (x, w[:, :32].contiguous(), s, z, 32),  # weight columns for K = 64
        (x, w, s[:, :3].contiguous(), z, 32),  # scales for K = 96
        (x, w, s, z.bfloat16(), 32),  # zeros in another dtype than x
        (x, w.to(torch.int8), s, z, 32),  # not the packed uint8
    ]
    for args in bad:
        with pytest.raises(ValueError, match=r"w4a8_\w+ needs x \[M, K\]"):
            fn(*args)


@needs_vnni
def test_vnni_op_registration():
    for m, k, g, dtype in [(3, 100, 32, torch.bfloat16), (1, 128, 128, torch.float32)]:
        x, q, s, z = _case(m, k, 8, g, dtype)
        torch.library.opcheck(registered(w4a8_vnni), (x, pack(q), s, z, g))


@pytest.fixture
def own_choices(tmp_path):
    """Kernel choices and pins of this test only (in a temp file, never the user's cache)."""
    ops.reset(tmp_path / "choices.json")
    yield
    ops.reset(tmp_path / "after.json")


@needs_vnni
def test_dispatch_runs_a_measured_or_pinned_choice(own_choices):
    x, q, s, z = _case(4, 128, 32, 64, torch.bfloat16)
    args = (x, pack(q), s, z, 64)
    want = {"reference": reference(*args), "vnni": w4a8_vnni(*args)}
    out = w4a8_linear(*args)
    (label,) = [k for k in ops.chosen() if k.startswith("w4a8_linear[cpu,bfloat16,rows=3-4")]
    assert torch.equal(out, want[ops.chosen()[label]])
    other = "vnni" if ops.chosen()[label] == "reference" else "reference"
    ops.pin({"w4a8_linear": other})
    assert torch.equal(w4a8_linear(*args), want[other])
    assert f"{other} (pinned)" in ops.chosen()[label]


# --- the scheme on the tiny LLaMA ---------------------------------------------------------


def _tiny(tie: bool = False, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    args = dataclasses.replace(TINY_LLAMA, tie_word_embeddings=tie)
    return from_seed(LlamaForCausalLM, args, 0, "cpu", dtype)


def _transformed(weights: str, tie: bool = False, dtype=torch.float32, **quant):
    """The tiny model through the recipe's transforms (fusion included) with these opts."""
    cfg = recipe_config(
        {"quant": {"weights": weights, **quant}, "fusion": {"projections": weights != "none"}}
    )
    return apply_transforms(_tiny(tie, dtype), cfg)


def _logits(model) -> torch.Tensor:
    (run,) = forwards(random_batches(TINY_LLAMA.vocab_size, 1, 24, seed=1))
    with torch.no_grad():
        return run(model).float()


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("tie", [False, True])
def test_weights_are_int4s_and_a_tied_head_stays_weight_only(tie):
    """Same q, scales and zeros as the int4 scheme for every matrix (so the same checkpoint
    tensors); embeddings and a tied head are int4 modules sharing one table."""
    int4 = Int4WeightOnly(32).quantize(_tiny(tie))
    w4a8 = W4A8(32).quantize(_tiny(tie))
    mods = dict(w4a8.named_modules())
    linears = [n for n, m in mods.items() if isinstance(m, W4A8Linear)]
    assert len(linears) == 7 * TINY_LLAMA.num_hidden_layers + (not tie)
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in w4a8.modules())
    assert isinstance(w4a8.model.embed_tokens, Int4Embedding)
    if tie:
        assert isinstance(w4a8.lm_head, Int4Linear)
        assert w4a8.lm_head.weight_packed is w4a8.model.embed_tokens.weight_packed
    ref = Int4WeightOnly(32).state_dict(int4)
    state = W4A8(32).state_dict(w4a8)
    assert state.keys() == ref.keys()
    assert all(torch.equal(state[k], ref[k]) for k in ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_and_tokens_close_to_int4(dtype):
    """w4a8 differs from int4 only by rounding each activation row to 255 levels of its own
    max|x|: a relative error per linear of about max|x| / (127 sqrt(12) rms(x)), under 1% for
    these rows. So its logits stay within 2% of int4's, a small fraction of what rounding the
    weights to 4 bits costs against float, and the greedy tokens match int4's."""
    ref = _logits(_transformed("none", dtype=dtype))
    int4 = _logits(_transformed("int4", dtype=dtype))
    w4a8 = _logits(_transformed("w4a8", dtype=dtype))
    assert _rel(w4a8, int4) < 0.02
    assert _rel(w4a8, int4) < 0.2 * _rel(int4, ref)
    assert (w4a8.argmax(-1) == int4.argmax(-1)).float().mean() >= 0.9


def test_greedy_generation_matches_int4():
    from common.core.request import Request
    from common.device.select import Device
    from common.engine.engine import Engine
    from common.kv.spec import KVSpec

    prompts = ([5, 17, 33, 8, 61, 22, 9], [40, 3], [12, 70, 44, 19, 88])

    def generate(model) -> list[list[int]]:
        engine = Engine(model, Device("cpu"), KVSpec("contiguous"), "flash")
        return [c.tokens for c in engine.generate([Request(list(p), 8) for p in prompts])]

    assert generate(_transformed("w4a8")) == generate(_transformed("int4"))


def test_options_skip_and_group_size():
    model = _transformed("w4a8", group_size=64, skip=["lm_head", "layers.0.mlp"])
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is Int4Embedding
    assert type(model.model.layers[0].mlp.gate_up_proj) is nn.Linear
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert all(
        m.group_size == 64 for m in model.modules() if isinstance(m, (W4A8Linear, Int4Embedding))
    )
    scheme = configured_scheme(OmegaConf.create({"weights": "w4a8", "group_size": 32}))
    assert scheme.group_size == 32 and scheme.quantization_config()["activations"] == {
        "bits": 8,
        "dynamic": True,
        "granularity": "per_token",
    }
    with pytest.raises(RecipeError, match="quant.group_size must be one of 32, 64, 128, got 48"):
        W4A8(48)


def test_checkpoint_roundtrip_and_checks(tmp_path):
    """quant.save then model.path: the same logits, a tied table shared again, the int4
    scheme's tensors; another scheme's or a mismatched checkpoint is a clear error."""
    from safetensors.torch import load_file, save_file

    from common.io.quantized import load_quantized, save_quantized

    model = _transformed("w4a8", tie=True, group_size=32)
    scheme = configured_scheme(OmegaConf.create({"weights": "w4a8", "group_size": 32}))
    out = save_quantized(model, scheme, tmp_path / "q", None, True)
    loaded = load_quantized(LlamaForCausalLM, out, "cpu", torch.float32)
    assert loaded.quantization_config["scheme"] == "w4a8"
    assert loaded.lm_head.weight_packed is loaded.model.embed_tokens.weight_packed
    assert type(loaded.model.layers[0].mlp.down_proj) is W4A8Linear
    assert torch.equal(_logits(loaded), _logits(model))
    with pytest.raises(RecipeError, match="is not the w4a8 scheme"):
        scheme.load_state_dict(_tiny(True), scheme.state_dict(model), {"scheme": "int4"})

    state = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.scales"
    save_file({**state, name: state[name][:, :1].contiguous()}, out / "model.safetensors")
    with pytest.raises(RecipeError, match=rf"{name} \(32, 1\), expected \(32, 2\)"):
        load_quantized(LlamaForCausalLM, out, "cpu", torch.float32)


@needs_vnni
def test_compile_traces_through_the_w4a8_module(own_choices):
    """torch.compile(fullgraph) sees the op as one node (its fake impl gives the shape)."""
    down = W4A8(32).quantize(_tiny()).model.layers[0].mlp.down_proj
    ops.pin({"w4a8_linear": "vnni"})
    x = torch.randn(3, down.in_features)
    compiled = torch.compile(down, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), down(x))
