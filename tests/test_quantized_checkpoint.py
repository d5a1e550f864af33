"""Quantized checkpoints: quantize once, save, load without rounding again; strict checks."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from common.core.errors import RecipeError
from common.io.checkpoint import from_seed
from common.io.presets import build_model
from common.io.quantized import load_quantized, save_quantized
from common.quant.scheme import configured_scheme, get_scheme
from common.transforms.forwards import forwards
from common.transforms.registry import apply_transforms
from models.llama import LlamaForCausalLM
from tests.tiny import TINY_LLAMA, random_batches, recipe_config

ROOT = Path(__file__).resolve().parents[1]
ARGS = dataclasses.replace(TINY_LLAMA, tie_word_embeddings=True)


def _cfg(weights: str, **quant) -> OmegaConf:
    """The keys the transforms read, as the recipe's config has them."""
    return recipe_config(
        {
            "quant": {
                "weights": weights,
                "alpha": 0.5,
                "smooth": True,
                "calib": {"num_samples": 2, "seq_len": 16},
                **quant,
            },
            "fusion": {"projections": weights != "none"},
            "model": {"seed": 0},
        }
    )


def _logits(model) -> torch.Tensor:
    (run,) = forwards(random_batches(ARGS.vocab_size, 1, 12, seed=1))
    return run(model)


def _quantized(weights: str, dtype=torch.float32, **quant):
    model = from_seed(LlamaForCausalLM, ARGS, 0, "cpu", dtype)
    return apply_transforms(model, _cfg(weights, **quant))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "weights, quant", [("int8", {}), ("int8", {"group_size": 32}), ("w8a8", {}), ("w4a8", {})]
)
def test_save_load_gives_identical_logits(tmp_path, weights, quant, dtype):
    model = _quantized(weights, dtype, **quant)
    src = tmp_path / "float"
    src.mkdir()
    (src / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                **{f.name: getattr(ARGS, f.name) for f in dataclasses.fields(ARGS)},
            }
        )
    )
    (src / "tokenizer_config.json").write_text("{}")
    scheme = configured_scheme(_cfg(weights, **quant).quant)
    out = save_quantized(model, scheme, tmp_path / "q", src, True)
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["scheme"] == weights and saved["fused_projections"] is True
    assert saved.get("group_size") == quant.get("group_size", saved.get("group_size"))
    assert (out / "tokenizer_config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left

    loaded = load_quantized(LlamaForCausalLM, out, "cpu", dtype)
    assert torch.equal(_logits(loaded), _logits(model))
    # The transforms see it is quantized already: no second rounding, same logits.
    again = apply_transforms(loaded, _cfg(weights, **quant))
    assert torch.equal(_logits(again), _logits(model))


def test_recipe_loader_reads_a_quantized_checkpoint(tmp_path):
    model = _quantized("w8a8", smooth=False)
    out = save_quantized(
        model, configured_scheme(_cfg("w8a8", smooth=False).quant), tmp_path / "q", None, True
    )
    mcfg = OmegaConf.create({"path": str(out), "allow_pickle": False})
    loaded, tokenizer, desc = build_model(
        mcfg, LlamaForCausalLM, torch.device("cpu"), torch.float32
    )
    assert desc.startswith("w8a8 checkpoint") and tokenizer is None
    assert torch.equal(_logits(loaded), _logits(model))


def test_checkpoint_made_with_other_opts_is_an_error(tmp_path):
    out = save_quantized(
        _quantized("w8a8"), configured_scheme(_cfg("w8a8").quant), tmp_path / "q", None, True
    )
    loaded = load_quantized(LlamaForCausalLM, out, "cpu", torch.float32)
    for cfg, asked in [
        (_cfg("w8a8", alpha=0.8), r"w8a8 \(bits=8, smooth=True, alpha=0.8\)"),
        (_cfg("int8"), r"int8 \(bits=8\)"),
        (_cfg("int8", group_size=64), r"int8 \(bits=8, group_size=64\)"),
    ]:
        with pytest.raises(RecipeError, match=f"quantized as w8a8 .* opts ask for {asked}"):
            apply_transforms(loaded, cfg)
    assert apply_transforms(loaded, _cfg("none")) is loaded  # no quant opt: runs as saved


def _saved(tmp_path) -> Path:
    return save_quantized(_quantized("int8"), get_scheme("int8"), tmp_path / "q", None, True)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_corrupt_or_mismatched_checkpoints_fail_with_one_line(tmp_path):
    out = _saved(tmp_path)
    weights = out / "model.safetensors"
    state = load_file(weights)

    def rewrite(**changes) -> None:
        new = {**state, **changes}
        save_file({k: v for k, v in new.items() if v is not None}, weights)

    name = "model.layers.0.mlp.down_proj.weight"
    cases = {
        "missing": (
            {name: None, name + "_scale": None},
            r"missing \['model.layers.0.mlp.down_proj",
        ),
        "shape": ({name: state[name][:, :-1].contiguous()}, r"down_proj.weight \(32, 63\)"),
        "scale": ({name + "_scale": None}, r"down_proj.weight"),
        "extra": ({"model.layers.0.extra.bias": state["model.norm.weight"].clone()}, "unexpected"),
        "nan": (
            {"model.norm.weight": torch.full_like(state["model.norm.weight"], float("nan"))},
            "non-finite",
        ),
    }
    for changes, match in cases.values():
        rewrite(**changes)
        with pytest.raises(RecipeError, match=match) as e:
            load_quantized(LlamaForCausalLM, out, "cpu", torch.float32)
        _one_line(e)
    weights.write_bytes(weights.read_bytes()[:200])  # truncated
    with pytest.raises(RecipeError, match="corrupt|cannot read") as e:
        load_quantized(LlamaForCausalLM, out, "cpu", torch.float32)
    _one_line(e)

    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(RecipeError, match="quant_method 'awq'") as e:
        load_quantized(LlamaForCausalLM, out, "cpu", torch.float32)
    _one_line(e)


def test_save_refuses_a_non_empty_directory(tmp_path):
    out = _saved(tmp_path)
    with pytest.raises(RecipeError, match="not an empty directory"):
        save_quantized(_quantized("int8"), get_scheme("int8"), out, None, True)


def test_quantize_script_writes_what_the_recipe_loads(tmp_path):
    out = tmp_path / "q"
    cmd = [sys.executable, str(ROOT / "scripts/quantize.py"), "+opt=w8a8", "model.scale=tiny"]
    run = subprocess.run([*cmd, f"quant.save={out}"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and (out / "model.safetensors").is_file()
    loaded = load_quantized(LlamaForCausalLM, out, "cpu", torch.float32)
    assert loaded.quantization_config["scheme"] == "w8a8"
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)  # no quant.save
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "quant.save=DIR" in run.stderr


def test_preflight_refuses_other_opts_before_any_worker(tmp_path):
    from common.bench.cli import compose_config
    from common.bench.preflight import preflight

    model = _quantized("w8a8")
    out = save_quantized(model, configured_scheme(_cfg("w8a8").quant), tmp_path / "q", None, True)
    ok = compose_config("llama65b", ["+opt=w8a8", f"model.path={out}"])
    assert preflight(ok, LlamaForCausalLM).config.quant.weights == "w8a8"
    bad = compose_config("llama65b", ["+opt=w8a8", f"model.path={out}", "quant.alpha=0.7"])
    with pytest.raises(RecipeError, match="quantized as w8a8 .* ask for w8a8 .*alpha=0.7"):
        preflight(bad, LlamaForCausalLM)
