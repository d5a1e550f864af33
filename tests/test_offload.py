"""Offload: layers streamed from host memory or from a file on disk give the very logits and
tokens of the model held in memory."""

from pathlib import Path

import pytest
import torch
from tiny import TINY_LLAMA

from common.core.errors import RecipeError
from common.core.request import Request
from common.device.select import Device
from common.engine.engine import Engine
from common.io.checkpoint import from_seed
from common.parallel.measured import weight_bytes
from common.parallel.offload import offload_layers
from common.quant.scheme import get_scheme
from models.llama import LlamaForCausalLM

ARGS = TINY_LLAMA.__class__(**{**TINY_LLAMA.__dict__, "num_hidden_layers": 3})  # odd: slots rotate


def _run(model) -> tuple[list[list[int]], torch.Tensor]:
    engine = Engine(model, Device("cpu"), "contiguous", "eager")
    reqs = [Request([1, 2, 3, 4, 5], 6, ignore_eos=True), Request([9, 8], 4, ignore_eos=True)]
    tokens = [c.tokens for c in engine.generate(reqs)]
    return tokens, engine.teacher_forced_logits([1, 2, 3, 4, 5], tokens[0])


def _model(int8: bool = False):
    model = from_seed(LlamaForCausalLM, ARGS, seed=0)
    return get_scheme("int8").quantize(model) if int8 else model


@pytest.mark.parametrize(
    "mode,cold,int8", [("cpu", False, False), ("disk", False, False), ("disk", True, True)]
)
def test_offloaded_model_gives_identical_logits(
    tmp_path: Path, mode: str, cold: bool, int8: bool
) -> None:
    want = _run(_model(int8))
    model = offload_layers(_model(int8), mode, torch.device("cpu"), tmp_path, cold)
    one_layer = weight_bytes(model.model.layers[0])
    # the device keeps two layer buffers, not three layers
    assert weight_bytes(model) == weight_bytes(_model(int8)) - one_layer
    got = _run(model)
    assert got[0] == want[0]
    assert torch.equal(got[1], want[1])
    assert not list(tmp_path.iterdir())  # the layer file is unlinked once open
    model.offload.close()


def test_cold_needs_disk() -> None:
    with pytest.raises(RecipeError, match="offload=disk"):
        offload_layers(_model(), "cpu", torch.device("cpu"), cold=True)


def test_offload_on_paper_for_65b() -> None:
    """bf16 LLaMA-65B does not fit 64 GiB; offloaded, the device keeps embedding, head and
    two layers, and the rest is KV room."""
    import importlib.util
    from argparse import Namespace

    path = Path(__file__).resolve().parents[1] / "scripts/offload_table.py"
    spec = importlib.util.spec_from_file_location("offload_table", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    a = Namespace(device_gib=64, hbm_gbs=1600, link_gbs=25, disk_gbs=7, tflops=300, context=2048)
    rows = {(r["weights"], r["layers_on"]): r for r in script.table(a, batch=1)}
    in_memory, host = rows["bf16", "device memory"], rows["bf16", "host memory"]
    assert not in_memory["fits"] and host["fits"]
    per_layer = (in_memory["weights_gib"] - host["on_device_gib"]) / (80 - 2)
    assert host["on_device_gib"] < 3 * per_layer + 2  # embedding + head ~1 GiB each
    assert host["kv_tokens"] > 20_000  # the room the offloaded layers leave for KV
