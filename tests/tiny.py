"""The tiny LLaMA the engine, serving and KV tests build: small enough for many fp32 runs."""

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from models.llama import LlamaArgs

DEFAULTS = Path(__file__).resolve().parents[1] / "configs" / "recipe_defaults.yaml"


def recipe_config(overrides: dict[str, Any]) -> DictConfig:
    """The recipes' defaults with `overrides`: every key a transform may read is present."""
    return OmegaConf.merge(OmegaConf.load(DEFAULTS), overrides)


TINY_LLAMA = LlamaArgs(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA, so the sdpa path takes enable_gqa
    max_position_embeddings=96,
)


def random_batches(vocab: int, batches: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    """Seeded uniform token ids [1, length]: calibration batches for tests that need no text."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, length), generator=gen) for _ in range(batches)]


def hf_llama_checkpoint(path: Path) -> Path:
    """A seeded transformers LLaMA (256-token vocab, 2 layers, GQA) saved with save_pretrained
    at `path`, no tokenizer: what the scripts that take --model-path read."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path
