"""W8A8: the int8 x int8 kernels against the reference math, SmoothQuant's smoothing, and the
scheme on the tiny LLaMA."""

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from common import ops
from common.core.errors import RecipeError
from common.io.checkpoint import from_seed
from common.ops.library import loads, registered
from common.ops.w8a8_linear import (
    dequant_mm,
    int_mm,
    int_mm_cpp,
    onednn_mm,
    quantize_rows,
    s8s8_vnni,
    w8a8_linear,
    w8a8_vnni,
)
from common.quant.scheme import configured_scheme
from common.quant.smooth import collect, smooth
from common.quant.w8a8 import W8A8, W8A8Linear, _activation_linears
from common.transforms.forwards import forwards
from common.transforms.fusion import fuse_projections
from models.llama import LlamaForCausalLM
from tests.tiny import TINY_LLAMA, random_batches

needs_vnni = pytest.mark.skipif(not loads("int8_vnni"), reason="this CPU has no AVX512-VNNI")
ROWS = [1, 2, 3, 4, 5, 8, 13, 16, 17, 40]  # every register block size, its tails, past 16
SHAPES = [(64, 96), (100, 37), (576, 200), (1000, 9)]  # K % 64 == 0 and tails; N % 8 tails


def _case(m: int, k: int, n: int, dtype: torch.dtype, with_smooth: bool):
    x = torch.randn(m, k, dtype=dtype) * 3
    x[:, 3] *= 50  # an outlier channel
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scales = ((torch.rand(n) + 0.5) / 100).to(dtype)
    smooth_inv = (torch.rand(k) + 0.5).to(dtype) if with_smooth else None
    return x, w, scales, smooth_inv


def _reference(x, w, scales, smooth_inv):
    """The definition: int32 products of the quantized rows, scaled per row and channel."""
    q, x_scale = quantize_rows(x, smooth_inv)
    acc = q.to(torch.int64) @ w.to(torch.int64).T  # exact
    return (acc.float() * (x_scale[:, None] * scales.float())).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_smooth", [False, True])
def test_quantize_rows_within_half_a_step(dtype, with_smooth):
    x, _, _, smooth_inv = _case(5, 100, 1, dtype, with_smooth)
    x[2] = 0  # an all-zero row quantizes to zeros
    q, scale = quantize_rows(x, smooth_inv)
    xs = x.float() * (1 if smooth_inv is None else smooth_inv.float())
    assert q.abs().max() <= 127 and torch.equal(q[2], torch.zeros_like(q[2]))
    assert torch.equal(q.abs().amax(dim=1)[[0, 1, 3, 4]], torch.full((4,), 127, dtype=torch.int8))
    assert ((xs - q.float() * scale[:, None]).abs() <= scale[:, None] / 2 * 1.0001).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["int_mm", "int_mm_cpp", "vnni", "onednn"])
def test_kernels_equal_the_reference_exactly(dtype, impl):
    """int32 accumulation is exact, and every kernel quantizes and scales in the same float
    ops: equal to the last bit, over every row block and K/N tail."""
    if impl in ("int_mm_cpp", "vnni") and not loads("int8_vnni"):
        pytest.skip("this CPU has no AVX512-VNNI")
    fn = {"int_mm": int_mm, "int_mm_cpp": int_mm_cpp, "vnni": w8a8_vnni, "onednn": onednn_mm}[impl]
    for m in ROWS:
        for k, n in SHAPES:
            for with_smooth in (False, True):
                args = _case(m, k, n, dtype, with_smooth)
                assert torch.equal(fn(*args), _reference(*args)), (impl, m, k, n, with_smooth)


def test_dequant_fallback_matches_while_fp32_sums_are_exact():
    for m in (1, 3, 16):
        args = _case(m, 576, 40, torch.float32, True)  # 576 * 127 * 127 < 2^24
        assert torch.equal(dequant_mm(*args), _reference(*args))


@needs_vnni
def test_vnni_integer_product_is_exact_at_the_extremes():
    """vpdpbusd's unsigned x signed trick (w XOR 0x80, minus 128 * the row sum) over the full
    int8 range, -128 included, and sums near the int32 limit's scale."""
    for m in (1, 2, 5, 16, 21):
        for k, n in [(64, 8), (130, 33), (4096, 12)]:
            q = torch.randint(-128, 128, (m, k), dtype=torch.int8)
            w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
            q[0], w[0] = -128, -128  # the largest positive products
            assert torch.equal(s8s8_vnni(q, w), (q.int() @ w.int().T)), (m, k, n)


@needs_vnni
def test_vnni_op_registration():
    torch.library.opcheck(registered(w8a8_vnni), _case(3, 100, 37, torch.bfloat16, True))
    torch.library.opcheck(registered(w8a8_vnni), _case(1, 64, 8, torch.float32, False))
    torch.library.opcheck(registered(int_mm_cpp), _case(20, 100, 37, torch.bfloat16, True))


@pytest.mark.skipif(not loads("int8_bf16dot"), reason="this CPU has no AVX512-BF16")
def test_weight_only_bf16dot_registration():
    from common.ops.int8_linear import int8_bf16dot_cpp

    x, w, scales, _ = _case(5, 100, 37, torch.bfloat16, False)
    torch.library.opcheck(registered(int8_bf16dot_cpp), (x, w, scales))


@pytest.fixture
def own_choices(tmp_path):
    """Kernel choices and pins of this test only (in a temp file, never the user's cache)."""
    ops.reset(tmp_path / "choices.json")
    yield
    ops.reset(tmp_path / "after.json")


def test_dispatch_runs_a_measured_or_pinned_choice(own_choices):
    args = _case(4, 64, 32, torch.bfloat16, True)
    assert torch.equal(w8a8_linear(*args), _reference(*args))
    (label,) = [k for k in ops.chosen() if k.startswith("w8a8_linear[cpu,bfloat16,rows=3-4")]
    other = "dequant_mm" if ops.chosen()[label] != "dequant_mm" else "int_mm"
    ops.pin({"w8a8_linear": other})
    assert torch.equal(w8a8_linear(*args), _reference(*args))
    assert f"{other} (pinned)" in ops.chosen()[label]


# --- the scheme on the tiny LLaMA ---------------------------------------------------------


def _tiny(dtype=torch.float32, outliers: bool = False, tie: bool = False):
    args = dataclasses.replace(TINY_LLAMA, tie_word_embeddings=tie)
    model = from_seed(LlamaForCausalLM, args, 0, "cpu", dtype)
    if outliers:  # what real LLMs show: a few channels far larger than the rest
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norm.weight[[3, 17]] *= 40
                layer.self_attn.v_proj.weight[[1, 9]] *= 30  # o_proj's input
                layer.mlp.up_proj.weight[[5, 40]] *= 30  # down_proj's input
    return model


def _calibration(n: int = 4):
    return forwards(random_batches(TINY_LLAMA.vocab_size, n, 16, seed=0))


def _logits(model) -> torch.Tensor:
    (run,) = forwards(random_batches(TINY_LLAMA.vocab_size, 1, 12, seed=1))
    return run(model).float()


def _rel(out, ref) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("fuse", [False, True])
def test_smoothing_alone_is_exact(fuse):
    """x W^T = (x / s)(W s)^T: with no rounding, smoothing changes the outputs only by float
    rounding, whether s goes into a norm (q/k/v, gate/up) or stays explicit (o, down)."""
    model = _tiny(outliers=True)
    ref = _logits(model)
    if fuse:
        fuse_projections(model)
    explicit = smooth(model, _calibration(), _activation_linears(model), alpha=0.5)
    names = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    assert sorted({names[m] for m in explicit}) == ["down_proj", "o_proj"]  # the rest: norms
    assert (model.model.layers[0].input_layernorm.weight != 1).any()  # folded in
    for linear, inv in explicit.items():
        linear.register_forward_pre_hook(lambda mod, a, inv=inv: (a[0] * inv,))
    assert _rel(_logits(model), ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smoothing_lowers_the_error_with_outlier_channels(dtype):
    ref = _logits(_tiny(dtype, outliers=True))
    err = {}
    for flag in (False, True):
        model = W8A8(0.5, flag).quantize(_tiny(dtype, outliers=True), _calibration())
        err[flag] = _rel(_logits(model), ref)
    assert err[True] < 0.75 * err[False], err
    assert err[True] < 0.05, err


def test_fused_projections_change_nothing():
    """Stacked q/k/v and gate/up share one input, one per-token scale and one smoothing."""
    outs = []
    for fuse in (False, True):
        model = _tiny(outliers=True)
        if fuse:
            fuse_projections(model)
        outs.append(_logits(W8A8().quantize(model, _calibration())))
    assert torch.equal(*outs)


def test_scheme_modules_and_options():
    model = W8A8(smooth=True).quantize(_tiny(tie=True), _calibration())
    assert model.lm_head.weight_int8 is model.model.embed_tokens.weight_int8  # tied: weight-only
    assert type(model.lm_head) is not W8A8Linear
    linears = [m for m in model.modules() if isinstance(m, W8A8Linear)]
    assert len(linears) == 7 * TINY_LLAMA.num_hidden_layers
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    scheme = configured_scheme(OmegaConf.create({"alpha": 0.8, "smooth": False, "weights": "w8a8"}))
    assert (scheme.alpha, scheme.smooth) == (0.8, False)
    assert scheme.quantization_config()["smooth"] is False
    with pytest.raises(RecipeError, match="calibration"):
        W8A8().quantize(_tiny(), None)
    with pytest.raises(RecipeError, match="alpha"):
        W8A8(alpha=1.5).quantize(_tiny(), _calibration())


def test_skipped_linears_stay_float_and_their_norm_unsmoothed():
    """A norm feeding a linear kept in float cannot take s: its siblings keep 1/s explicitly."""
    model = _tiny(outliers=True)
    norm_before = model.model.layers[0].input_layernorm.weight.clone()
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()

    def skip(name: str, module) -> bool:
        return name == "model.layers.0.self_attn.q_proj"

    W8A8().quantize(model, _calibration(), skip=skip)
    attn = model.model.layers[0].self_attn
    assert type(attn.q_proj) is torch.nn.Linear and torch.equal(attn.q_proj.weight, q_before)
    assert torch.equal(model.model.layers[0].input_layernorm.weight, norm_before)
    assert attn.k_proj.smooth is not None and attn.v_proj.smooth is not None
    assert model.model.layers[1].self_attn.k_proj.smooth is None  # folded into its norm


def test_alpha_one_flattens_the_norm_fed_inputs():
    """alpha=1 puts all of the range into the weights: s_j = max|X_j|, so the smoothed input
    of every norm-fed linear has max |x| = 1 in every channel on the calibration data."""
    model = _tiny(outliers=True)
    smooth(model, _calibration(), _activation_linears(model), alpha=1.0)
    stats = collect(model, _calibration())
    # Layer 0: later layers' inputs also change by the explicit multipliers not applied here.
    q_proj = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(stats.amax[q_proj], torch.ones(TINY_LLAMA.hidden_size))
    assert stats.feeder[q_proj] is model.model.layers[0].input_layernorm


def test_kernel_table_times_every_linear_kernel_per_rows(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "rows"
    cmd = [sys.executable, "scripts/linear_kernel_table.py", "--scale", "tiny", "--rounds", "1"]
    run = subprocess.run([*cmd, "--rows", "1,3", "--out", str(out)], cwd=root, capture_output=True)
    assert run.returncode == 0, run.stderr.decode()
    ms = json.loads(out.with_suffix(".json").read_text())["ms"]
    assert {"bf16_linear torch", "int8_linear cpp_matvec", "w8a8_linear int_mm"} <= set(ms)
    assert "int4_linear int4pack_mm" in ms and "w4a8_linear reference" not in ms  # too slow
    assert ("w8a8_linear vnni" in ms) == loads("int8_vnni")
    assert ("w4a8_linear vnni" in ms) == loads("int4_vnni")
    assert ("bf16_linear cpp_bf16dot" in ms) == loads("bf16dot")
    assert all(set(row) == {"1", "3"} and min(row.values()) > 0 for row in ms.values())


def test_onednn_packs_a_weight_once_and_drops_it_with_the_weight():
    from common.ops.w8a8_linear import _PACKED

    x, w, scales, _ = _case(4, 64, 24, torch.float32, False)
    w = w.clone()
    onednn_mm(x, w, scales, None)
    packed = _PACKED[id(w)][1][0]
    onednn_mm(x, w, scales, None)
    assert _PACKED[id(w)][1][0] is packed
    key = id(w)
    del w
    assert key not in _PACKED


def test_onednn_repacks_a_buffer_refilled_in_place():
    """Offload refills one buffer with each layer's weights in turn (marked so): every call
    sees the weights it holds now."""
    x, w, scales, _ = _case(4, 64, 24, torch.float32, False)
    buf = w.clone()
    buf.refilled_in_place = True
    onednn_mm(x, buf, scales, None)
    other = torch.randint(-127, 128, buf.shape, dtype=torch.int8)
    buf.view(torch.uint8).numpy()[:] = other.view(torch.uint8).numpy()  # as os.preadv writes
    assert torch.equal(onednn_mm(x, buf, scales, None), _reference(x, other, scales, None))


@needs_vnni
def test_compile_traces_through_the_w8a8_module(own_choices):
    """torch.compile(fullgraph) sees the op as one node (its fake impl gives the shape)."""
    model = W8A8().quantize(_tiny(), _calibration())
    down = model.model.layers[0].mlp.down_proj
    ops.pin({"w8a8_linear": "vnni"})
    x = torch.randn(3, down.in_features)
    compiled = torch.compile(down, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), down(x))


COMBOS = {  # KV spec, attention backend, scheduler (as tests/test_engine.py builds them)
    "flash_attn": ("contiguous", "flash", None),
    "paged_kv": ("paged", "sdpa", None),
    "paged_kv+cont_batch": ("paged", "flash", "continuous"),
}


@pytest.mark.parametrize("combo", COMBOS)
def test_w8a8_composes_with_kv_attention_and_scheduling(combo):
    """Per-token activation scales make a token's output independent of its batch mates, and
    every w8a8 kernel gives the same bits: the same greedy tokens as the plain path."""
    from common.core.request import Request
    from common.device.select import Device
    from common.engine.engine import Engine
    from common.engine.scheduler import SchedulerParams
    from common.kv.spec import KVSpec

    model = W8A8().quantize(_tiny(outliers=True), _calibration())
    prompts = ([5, 17, 33, 8, 61, 22, 9], [40, 3], [12, 70, 44, 19, 88])

    def generate(kv: KVSpec, attn: str, sched) -> list[list[int]]:
        engine = Engine(model, Device("cpu"), kv, attn, sched)
        return [c.tokens for c in engine.generate([Request(list(p), 6) for p in prompts])]

    kind, attn, sched = COMBOS[combo]
    kv = KVSpec(kind, block_size=4) if kind == "paged" else KVSpec(kind)
    got = generate(kv, attn, SchedulerParams(sched) if sched else None)
    assert got == generate(KVSpec("dynamic"), "eager", None)


def test_quantize_releases_float_weights():
    """Each float matrix is freed once replaced (the peak is not float + int8 model)."""
    import gc
    import weakref

    model = _tiny(outliers=True)
    refs = [weakref.ref(layer.mlp.down_proj.weight) for layer in model.model.layers]
    refs.append(weakref.ref(model.lm_head.weight))
    W8A8().quantize(model, _calibration())
    gc.collect()
    assert all(r() is None for r in refs)
