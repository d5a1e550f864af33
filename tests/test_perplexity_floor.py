"""scripts/perplexity_floor.py: the weights a quantized model computes with are read back
exactly, shuffling keeps each row's errors, and the script writes the rows it claims."""

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch
from tiny import hf_llama_checkpoint

from common.io.checkpoint import from_seed
from common.quant.int8 import quantize_int8
from models.llama import LlamaArgs, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # the script imports quant_sensitivity from there
_spec = importlib.util.spec_from_file_location(
    "perplexity_floor", ROOT / "scripts/perplexity_floor.py"
)
floor = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(floor)

ARGS = LlamaArgs(
    vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    tie_word_embeddings=True,
)  # fmt: skip


def test_effective_errors_are_the_int8_rounding_of_every_matrix_and_the_tied_table() -> None:
    model = from_seed(LlamaForCausalLM, ARGS, 0).float()
    quantized = quantize_int8(copy.deepcopy(model))
    errors = floor.effective_errors(model, quantized)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert set(errors) == {*linears, "model.embed_tokens"}
    for name, error in errors.items():
        q = quantized.get_submodule(name)
        expected = q.weight_int8.float() * q.scales.float()[:, None]
        weight = model.get_submodule(name).weight.float()
        torch.testing.assert_close(error, expected - weight, rtol=0, atol=1e-5)
        assert error.abs().max() <= q.scales.float().max() / 2 + 1e-6  # round to nearest
        assert error.abs().max() > 0


def test_shuffling_keeps_each_groups_errors_and_perturbing_unties() -> None:
    error = torch.randn(6, 64)
    for group, bounds in ((None, [0, 64]), (16, [0, 16, 32, 48, 64]), (24, [0, 24, 48, 64])):
        shuffled = floor.shuffled_within_groups(error, group, torch.Generator().manual_seed(0))
        for a, b in zip(bounds, bounds[1:]):  # each group, a partial last one too, keeps its own
            assert torch.equal(shuffled[:, a:b].sort(-1).values, error[:, a:b].sort(-1).values)
            assert not torch.equal(shuffled[:, a:b], error[:, a:b])
    model = from_seed(LlamaForCausalLM, ARGS, 0).float()
    assert model.get_submodule("lm_head").weight is model.get_submodule("model.embed_tokens").weight
    head = model.get_submodule("lm_head").weight.detach().clone()
    bumped = floor.perturbed(model, {"lm_head": torch.full_like(head, 0.5)})
    assert torch.equal(bumped.get_submodule("lm_head").weight, head + 0.5)
    assert torch.equal(bumped.get_submodule("model.embed_tokens").weight, head)  # untied
    assert torch.equal(model.get_submodule("lm_head").weight, head)  # the float model untouched


def test_script_writes_the_quantized_rows_and_the_shuffled_draws(tmp_path: Path) -> None:
    ckpt = hf_llama_checkpoint(tmp_path / "ckpt")
    cmd = [sys.executable, "scripts/perplexity_floor.py", "--model-path", str(ckpt), "--seeds",
           "3", "--eval-samples", "2", "--seq-len", "32", "--results-dir", str(tmp_path)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    result = json.loads((tmp_path / "perplexity_floor-ckpt-int8.json").read_text())
    rows = result["rows"]
    assert [r["model"] for r in rows[:2]] == [
        "quantized model (its kernels)",
        "its weights in bfloat16",
    ]
    assert len(rows) == 5 and all(r["perplexity"] > 1 for r in rows)
    draws = [r["change"] for r in rows[2:]]
    stats = result["shuffled"]
    assert stats["min"] == min(draws) <= stats["mean"] <= stats["max"] == max(draws)
    assert len(set(draws)) > 1  # different shuffles, different perplexities
    for bad, message in (
        (["--model-path", str(tmp_path / "missing")], "model directory"),
        (["--model-path", str(ckpt), "--seeds", "1"], "at least 2 shuffled copies"),
    ):
        run = subprocess.run(
            [sys.executable, "scripts/perplexity_floor.py", *bad], cwd=ROOT, capture_output=True,
            text=True,
        )  # fmt: skip
        assert run.returncode == 2 and message in run.stderr.strip().splitlines()[-1]
