"""Tests for common.io.checkpoint: HF-format checkpoint loading, seeded init and saving."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from common.core.errors import RecipeError
from common.io.checkpoint import (
    args_from_hf,
    build_empty,
    init_random,
    load_weights,
    read_hf_config,
    save_weights,
)

VOCAB, HIDDEN = 16, 8


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(HIDDEN, HIDDEN, bias=True)


class Inner(nn.Module):
    def __init__(self, n_layers: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Block() for _ in range(n_layers))
        self.norm = RMSNorm(HIDDEN)
        self.register_buffer("inv_freq", _inv_freq(), persistent=False)
        self.register_buffer("token_ids", torch.arange(4), persistent=True)  # int: never cast


class Tiny(nn.Module):
    tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, n_layers: int = 1) -> None:
        super().__init__()
        self.model = Inner(n_layers)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)


def _inv_freq() -> torch.Tensor:
    return 1.0 / (10000 ** (torch.arange(0, HIDDEN, 2, dtype=torch.float32) / HIDDEN))


def _seeded(seed: int = 0, n_layers: int = 1) -> Tiny:
    return init_random(build_empty(lambda: Tiny(n_layers)), "cpu", torch.float32, seed)


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _tiny_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _seeded().state_dict().items() if k != "lm_head.weight"}


# --- config -----------------------------------------------------------------------------------


def test_read_hf_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 32}))
    assert read_hf_config(tmp_path) == {"hidden_size": 32}


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        (lambda d: d / "nope", "does not exist"),
        (lambda d: d, "config.json not found"),
        (lambda d: (d / "config.json").write_text("{bad json") and d, "not valid JSON"),
        (lambda d: (d / "config.json").write_text("[1, 2]") and d, "must hold a JSON object"),
    ],
)
def test_read_hf_config_errors(tmp_path: Path, setup, fragment: str) -> None:
    path = setup(tmp_path)
    with pytest.raises(RecipeError, match=fragment) as info:
        read_hf_config(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


# --- build_empty / init_random ------------------------------------------------------------------


def test_build_empty_allocates_no_parameters_but_keeps_buffers() -> None:
    model = build_empty(lambda: Tiny(n_layers=2))
    assert all(p.is_meta for p in model.parameters())
    assert not model.model.inv_freq.is_meta
    assert torch.equal(model.model.inv_freq, _inv_freq())


def test_init_random_is_seeded_and_keeps_buffers() -> None:
    a, b, other = _seeded(0), _seeded(0), _seeded(1)
    _assert_same_state(a, b)
    assert not torch.equal(a.model.embed_tokens.weight, other.model.embed_tokens.weight)
    assert not any(p.is_meta for p in a.parameters())
    assert torch.equal(a.model.inv_freq, _inv_freq())  # not wiped like to_empty() would
    assert torch.equal(a.model.norm.weight, torch.ones(HIDDEN))
    assert torch.equal(a.model.layers[0].proj.bias, torch.zeros(HIDDEN))
    assert 0.01 < a.model.embed_tokens.weight.std().item() < 0.03
    assert a.lm_head.weight is a.model.embed_tokens.weight


def test_init_random_draws_in_float32_then_casts() -> None:
    f32 = _seeded(3)
    bf16 = init_random(build_empty(Tiny), "cpu", torch.bfloat16, 3)
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    assert bf16.model.inv_freq.dtype == torch.float32  # buffers are not cast
    assert torch.equal(bf16.model.embed_tokens.weight, f32.model.embed_tokens.weight.bfloat16())


def test_init_random_refuses_parameter_without_init_rule() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.empty(3))

    with pytest.raises(RecipeError, match=r"scale: Odd .* no reset_parameters"):
        init_random(build_empty(Odd), "cpu", torch.float32, 0)


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("max_shard_bytes", [None, 300])
def test_save_load_round_trip(tmp_path: Path, max_shard_bytes: int | None) -> None:
    src = _seeded(n_layers=2)
    save_weights(src, tmp_path, max_shard_bytes=max_shard_bytes)
    if max_shard_bytes is None:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert "lm_head.weight" not in index["weight_map"]
    dst = load_weights(build_empty(lambda: Tiny(n_layers=2)), tmp_path, "cpu", torch.float32)
    _assert_same_state(src, dst)
    assert dst.lm_head.weight is dst.model.embed_tokens.weight
    assert torch.equal(dst.model.inv_freq, _inv_freq())
    assert not dst.training


def test_save_replaces_stale_single_file_with_shards(tmp_path: Path) -> None:
    save_weights(_seeded(0), tmp_path)
    save_weights(_seeded(1), tmp_path, max_shard_bytes=300)
    assert not (tmp_path / "model.safetensors").exists()
    _assert_same_state(_seeded(1), load_weights(build_empty(Tiny), tmp_path, "cpu", torch.float32))


def test_save_refuses_meta_model(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="model.embed_tokens.weight.*meta device"):
        save_weights(build_empty(Tiny), tmp_path)


def test_load_casts_floats_only(tmp_path: Path) -> None:
    save_weights(_seeded(), tmp_path)
    model = load_weights(build_empty(Tiny), tmp_path, "cpu", torch.bfloat16)
    assert model.model.layers[0].proj.weight.dtype == torch.bfloat16
    assert model.model.token_ids.dtype == torch.int64
    assert model.model.inv_freq.dtype == torch.float32


def test_present_dependent_is_still_tied(tmp_path: Path) -> None:
    state = _tiny_state()
    state["lm_head.weight"] = torch.full((VOCAB, HIDDEN), 7.0)
    model = load_weights(build_empty(Tiny), _write(tmp_path, state), "cpu", torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])


# --- checkpoints written by transformers --------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_loads_transformers_checkpoint(tmp_path: Path, tie: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path)
    assert read_hf_config(tmp_path)["tie_word_embeddings"] is tie

    model = build_empty(lambda: LlamaForCausalLM(config))
    if tie:  # HF uses the same dependent -> source mapping under its own attribute name
        model.tied_weights = dict(model._tied_weights_keys)
    load_weights(model, tmp_path, "cpu", torch.float32)
    _assert_same_state(reference, model)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, model(ids).logits)


# --- strict checks ------------------------------------------------------------------------------


def test_missing_tensors_are_named(tmp_path: Path) -> None:
    state = _tiny_state()
    del state["model.norm.weight"]
    with pytest.raises(RecipeError, match=r"missing 1 tensor\(s\): model\.norm\.weight$"):
        load_weights(build_empty(Tiny), _write(tmp_path, state), "cpu", torch.float32)


def test_many_missing_tensors_are_abbreviated(tmp_path: Path) -> None:
    path = _write(tmp_path, {"model.embed_tokens.weight": torch.zeros(VOCAB, HIDDEN)})
    with pytest.raises(RecipeError, match=r"missing 10 tensor\(s\): .* and 5 more") as info:
        load_weights(build_empty(lambda: Tiny(n_layers=4)), path, "cpu", torch.float32)
    assert "model.layers.0.proj.weight" in str(info.value)


def test_unexpected_tensor_is_named(tmp_path: Path) -> None:
    state = _tiny_state() | {"model.extra.weight": torch.zeros(2)}
    with pytest.raises(RecipeError, match=r"unexpected 1 tensor\(s\): model\.extra\.weight"):
        load_weights(build_empty(Tiny), _write(tmp_path, state), "cpu", torch.float32)


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    state = _tiny_state() | {"model.layers.0.proj.weight": torch.zeros(3, 3)}
    expected = "model.layers.0.proj.weight: checkpoint shape (3, 3) != model shape (8, 8)"
    with pytest.raises(RecipeError, match=re.escape(expected)):
        load_weights(build_empty(Tiny), _write(tmp_path, state), "cpu", torch.float32)


@pytest.mark.parametrize("corrupt", [lambda b: b[: len(b) // 2], lambda _: b"garbage" * 8])
def test_corrupt_safetensors_names_the_file(tmp_path: Path, corrupt) -> None:
    save_weights(_seeded(), tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(corrupt(file.read_bytes()))
    with pytest.raises(RecipeError, match="corrupt") as info:
        load_weights(build_empty(Tiny), tmp_path, "cpu", torch.float32)
    assert str(file) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_directory_and_no_weights(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        load_weights(build_empty(Tiny), tmp_path / "absent", "cpu", torch.float32)
    with pytest.raises(RecipeError, match=r"no weights found .*model\.safetensors.*\.bin"):
        load_weights(build_empty(Tiny), tmp_path, "cpu", torch.float32)


def test_index_naming_absent_shard(tmp_path: Path) -> None:
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(RecipeError, match="model-00001-of-00002.safetensors"):
        load_weights(build_empty(Tiny), tmp_path, "cpu", torch.float32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_refused_naming_the_tensor(tmp_path: Path, bad: float) -> None:
    state = _tiny_state()
    state["model.layers.0.proj.weight"][3, 5] = bad
    path = _write(tmp_path, state)
    with pytest.raises(RecipeError) as info:
        load_weights(build_empty(Tiny), path, "cpu", torch.bfloat16)
    message = str(info.value)
    assert "tensor model.layers.0.proj.weight holds 1 non-finite value(s)" in message
    assert str(path / "model.safetensors") in message and "\n" not in message


def test_value_that_overflows_the_load_dtype_is_refused(tmp_path: Path) -> None:
    state = _tiny_state()
    state["model.norm.weight"][0] = 1e5  # finite in fp32 and bf16, inf in float16
    path = _write(tmp_path, state)
    load_weights(build_empty(Tiny), path, "cpu", torch.bfloat16)
    with pytest.raises(
        RecipeError, match=r"model\.norm\.weight has values up to 1e\+05, beyond float16"
    ):
        load_weights(build_empty(Tiny), path, "cpu", torch.float16)


# --- architecture ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "recipe_cls", "fragment"),
    [
        (
            {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 768},
            "LlamaForCausalLM",
            "architectures GPT2LMHeadModel, model_type 'gpt2'; this recipe runs "
            "LlamaForCausalLM: no recipe here runs it; recipes: llama65b (LlamaForCausalLM), "
            "chatglm (GlmForCausalLM)",
        ),
        (
            {"architectures": ["GlmForCausalLM"], "model_type": "glm"},
            "LlamaForCausalLM",
            "this recipe runs LlamaForCausalLM: run it with recipes/chatglm/run.py",
        ),
        (
            {"model_type": "llama"},
            "GlmForCausalLM",
            "model_type 'llama'; this recipe runs GlmForCausalLM: run it with "
            "recipes/llama65b/run.py",
        ),
        (
            {"architectures": ["ChatGLMModel"], "model_type": "chatglm"},
            "GlmForCausalLM",
            "THUDM's remote-code ChatGLM layout; use the transformers layout",
        ),
    ],
)
def test_other_architecture_names_it_and_the_recipe_that_fits(
    tmp_path: Path, config: dict, recipe_cls: str, fragment: str
) -> None:
    from models.glm import GlmForCausalLM
    from models.llama import LlamaForCausalLM

    cls = {"LlamaForCausalLM": LlamaForCausalLM, "GlmForCausalLM": GlmForCausalLM}[recipe_cls]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RecipeError) as info:
        args_from_hf(cls, tmp_path)
    assert fragment in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_config_without_architecture_names_is_read_by_its_keys(tmp_path: Path) -> None:
    from models.llama import LlamaForCausalLM

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(RecipeError, match="model config lacks vocab_size"):
        args_from_hf(LlamaForCausalLM, tmp_path)


# --- pickle -------------------------------------------------------------------------------------


def test_pickle_refused_without_opt_in_then_loaded(tmp_path: Path) -> None:
    src = _seeded()
    torch.save(_tiny_state(), tmp_path / "pytorch_model.bin")
    with pytest.raises(
        RecipeError, match=r"pickle checkpoint refused; set model\.allow_pickle=true"
    ):
        load_weights(build_empty(Tiny), tmp_path, "cpu", torch.float32)
    model = load_weights(build_empty(Tiny), tmp_path, "cpu", torch.float32, allow_pickle=True)
    _assert_same_state(src, model)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_sharded_pickle_index(tmp_path: Path) -> None:
    state = _tiny_state()
    names = list(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[:2],
        "pytorch_model-00002-of-00002.bin": names[2:],
    }
    weight_map = {}
    for file_name, shard in shards.items():
        torch.save({n: state[n] for n in shard}, tmp_path / file_name)
        weight_map.update(dict.fromkeys(shard, file_name))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_weights(build_empty(Tiny), tmp_path, "cpu", torch.float32, allow_pickle=True)
    _assert_same_state(_seeded(), model)


class _Evil:
    """Unpickling this would run code (touch a file) if torch.load were not weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_is_rejected(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": _Evil(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(
        RecipeError, match=r"pytorch_model\.bin: torch\.load\(weights_only=True\) failed"
    ):
        load_weights(build_empty(Tiny), tmp_path, "cpu", torch.float32, allow_pickle=True)
    assert not marker.exists()


def test_pickle_that_is_not_a_tensor_dict_is_rejected(tmp_path: Path) -> None:
    torch.save({"model.embed_tokens.weight": 3}, tmp_path / "weights.pt")
    with pytest.raises(RecipeError, match="'model.embed_tokens.weight' is not a named tensor"):
        load_weights(build_empty(Tiny), tmp_path, "cpu", torch.float32, allow_pickle=True)


def test_safetensors_preferred_over_pickle(tmp_path: Path) -> None:
    save_weights(_seeded(0), tmp_path)
    torch.save({"junk": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    model = load_weights(build_empty(Tiny), tmp_path, "cpu", torch.float32)  # no pickle opt-in
    assert torch.equal(
        model.model.embed_tokens.weight,
        load_file(tmp_path / "model.safetensors")["model.embed_tokens.weight"],
    )
