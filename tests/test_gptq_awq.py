"""GPTQ and AWQ: lower error than round to nearest on their calibration activations, outputs
close to float, the same modules as int4, and the calibration/eval text split."""

from itertools import islice

import pytest
import torch
from torch import nn

from common.core.errors import RecipeError
from common.io.checkpoint import from_seed
from common.quant.awq import search_clip, search_scales
from common.quant.calibrated import AWQ, GPTQ
from common.quant.data import (
    byte_encoder,
    default_texts,
    load_texts,
    token_blocks,
)
from common.quant.gptq import Hessian, gptq
from common.quant.int4 import (
    Int4Embedding,
    Int4Linear,
    fake_rtn,
    pad_groups,
    quantize_int4,
    quantize_rtn,
)
from common.quant.int8 import Int8WeightOnlyLinear
from common.transforms.calibrate import layerwise
from models.llama import LlamaArgs, LlamaForCausalLM

ARGS = dict(
    vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=128,
)  # fmt: skip


def _model(kv_heads: int = 4, fused: bool = False) -> LlamaForCausalLM:
    model = from_seed(LlamaForCausalLM, LlamaArgs(**ARGS, num_key_value_heads=kv_heads), 0)
    if fused:
        from common.transforms.fusion import fuse_projections

        fuse_projections(model)
    return model


def _blocks(n: int = 6, seq: int = 48) -> torch.Tensor:
    return token_blocks(default_texts("calib"), byte_encoder(256), n, seq)


def _correlated_inputs(t: int = 512, k: int = 128) -> torch.Tensor:
    """Activations with a few loud channels and correlations, like a transformer's."""
    x = torch.randn(t, k) @ (torch.randn(k, k) * 0.3 + torch.eye(k))
    x[:, :4] *= 20
    return x


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("g", [32, 128])
def test_gptq_beats_round_to_nearest_on_its_calibration_inputs(act_order: bool, g: int) -> None:
    x, w = _correlated_inputs(), torch.randn(96, 128)
    h = Hessian(128, x.device)
    for chunk in x.split(100):  # running average over batches == all at once
        h.add(chunk)
    torch.testing.assert_close(h.h, 2 * x.t() @ x / len(x), rtol=1e-4, atol=1e-3)
    q, scales, zeros = gptq(w, h.h, 4, g, act_order)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scales.shape == (96, 128 // g)
    rep = lambda t: t.float().repeat_interleave(g, 1)  # noqa: E731
    deq = (q.float() - 8) * rep(scales) + rep(zeros)
    ref = x @ w.t()
    err_gptq = (x @ deq.t() - ref).pow(2).mean()
    err_rtn = (x @ fake_rtn(w, g).t() - ref).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn


def test_gptq_int8_per_channel() -> None:
    x, w = _correlated_inputs(), torch.randn(32, 128)
    h = Hessian(128, x.device)
    h.add(x)
    q, scales, zeros = gptq(w, h.h, 8, 128)
    assert q.dtype == torch.int8 and scales.shape == (32,) and zeros is None
    deq = q.float() * scales[:, None]
    rtn = (w / scales[:, None]).round().clamp(-127, 127) * scales[:, None]
    ref = x @ w.t()
    assert (x @ deq.t() - ref).pow(2).mean() < (x @ rtn.t() - ref).pow(2).mean()


def test_awq_search_never_worse_than_round_to_nearest() -> None:
    x, ws = _correlated_inputs(), [torch.randn(64, 128), torch.randn(32, 128)]
    s = search_scales(x, ws, 32)
    err = lambda scale: sum(  # noqa: E731
        float(((x / scale) @ fake_rtn(w * scale, 32).t() - x @ w.t()).pow(2).mean()) for w in ws
    )
    assert s.shape == (128,) and (s > 0).all()
    assert err(s) < err(torch.ones(128))


@pytest.mark.parametrize("k", [128, 96])  # 96: a last group narrower than 64
def test_awq_clip_never_worse_than_round_to_nearest(k: int) -> None:
    x, w = _correlated_inputs(k=k), torch.randn(48, k)
    w[:, 5] *= 8  # an outlier weight widens its groups' grids
    clipped = search_clip(x, w, 64)
    err = lambda v: float((x @ fake_rtn(v, 64).t() - x @ w.t()).pow(2).mean())  # noqa: E731
    groups = lambda v: pad_groups(v, 64).view(48, -1, 64)  # noqa: E731
    assert clipped.shape == w.shape
    assert (groups(clipped) >= groups(w).amin(-1, keepdim=True)).all()  # inside each group's
    assert (groups(clipped) <= groups(w).amax(-1, keepdim=True)).all()  # range
    assert err(clipped) < err(w)


def test_gptq_rounds_the_tied_head_and_its_embedding_shares_the_table() -> None:
    """The walk's last step is the head; GPTQ's table there is not round to nearest, and the
    tied embedding looks up the very same table (stored once)."""
    model = _model()
    model.lm_head.weight = model.model.embed_tokens.weight  # tie them
    weight = model.lm_head.weight.detach().clone()
    steps = list(layerwise(model, _blocks()))
    assert steps[-1].module is model and list(steps[-1].inputs) == ["lm_head"]
    model = GPTQ(4, 32).quantize(model, iter(steps))
    head, embed = model.lm_head, model.model.embed_tokens
    assert isinstance(head, Int4Linear) and isinstance(embed, Int4Embedding)
    assert head.weight_packed is embed.weight_packed
    assert not torch.equal(head.weight_packed, quantize_rtn(weight, 32).packed)


def _output_error(model: nn.Module, ref: torch.Tensor, blocks: torch.Tensor) -> float:
    with torch.no_grad():
        out = _logits(model, blocks)
    return ((out - ref).norm() / ref.norm()).item()


def _logits(model: nn.Module, blocks: torch.Tensor) -> torch.Tensor:
    """Full-model logits over the blocks, causal within each (the calibration walk's attention)."""
    from common.transforms.calibrate import _Causal

    positions = torch.arange(blocks.shape[1]).expand_as(blocks)
    return model.logits(model(blocks, positions, _Causal()))


@pytest.mark.parametrize(
    ("scheme", "kv_heads", "fused"),
    [(GPTQ(4, 32), 4, False), (GPTQ(4, 32, act_order=True), 2, True), (AWQ(32, 10), 4, False),
     (AWQ(32, 10), 2, True)],
)  # fmt: skip
def test_calibrated_schemes_beat_rtn_and_stay_close_to_float(scheme, kv_heads, fused) -> None:
    blocks = _blocks()
    float_model = _model(kv_heads, fused)
    with torch.no_grad():
        ref = _logits(float_model, blocks)
    rtn_err = _output_error(quantize_int4(_model(kv_heads, fused), 32), ref, blocks)
    model = _model(kv_heads, fused)
    model = scheme.quantize(model, layerwise(model, blocks))
    assert isinstance(model.model.layers[1].mlp.down_proj, Int4Linear)
    assert isinstance(model.lm_head, Int4Linear)
    err = _output_error(model, ref, blocks)
    assert err < rtn_err, (err, rtn_err)
    assert err < 0.3


def test_gptq_int8_produces_int8_modules() -> None:
    blocks = _blocks(4, 32)
    model = _model()
    q = GPTQ(8).quantize(model, layerwise(model, blocks))
    assert isinstance(q.model.layers[0].mlp.down_proj, Int8WeightOnlyLinear)
    assert isinstance(q.lm_head, Int8WeightOnlyLinear)


def test_calibrated_schemes_need_calibration() -> None:
    with pytest.raises(RecipeError, match="quant.weights=gptq needs calibration data"):
        GPTQ().quantize(_model())


def test_default_eval_text_is_never_calibration_text() -> None:
    calib, held_out = islice(default_texts("calib"), 400), islice(default_texts("eval"), 400)
    calib, held_out = list(calib), list(held_out)
    assert len(calib) == len(held_out) == 400
    assert not set(calib) & set(held_out)
    assert list(islice(default_texts("eval"), 400)) == held_out  # deterministic


def test_text_files_load_through_datasets(tmp_path) -> None:
    import json

    import pandas as pd

    rows = ["first document here", "second one"]
    (tmp_path / "a.txt").write_text("\n".join(rows) + "\n")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    pd.DataFrame({"text": rows}).to_parquet(tmp_path / "a.parquet")
    for name in ("a.txt", "a.jsonl", "a.parquet"):
        assert list(load_texts(str(tmp_path / name), None, "train", "calib")) == rows
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(RecipeError, match="has no 'text' field"):
        load_texts(str(tmp_path / "b.jsonl"), None, "train", "calib")
    with pytest.raises(RecipeError, match="must exist and end in .txt"):
        load_texts(str(tmp_path / "a.csv"), None, "train", "calib")
    blocks = token_blocks(rows, byte_encoder(256), 4, 8)
    assert blocks.shape == (4, 8) and int(blocks.min()) >= 3
    with pytest.raises(RecipeError, match="fewer than one block of 999"):
        token_blocks(rows, byte_encoder(256), 4, 999)
