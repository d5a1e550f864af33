"""The GGUF writer behind the llama_cpp peer: names, shapes and values read back with the
gguf package's own reader, the rotary permutation, and what it refuses. Needs only `gguf`
(pure Python), never llama.cpp."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from common.core.errors import RecipeError
from common.io.checkpoint import from_seed
from common.io.gguf import _rope_permute, write_gguf
from models.glm import GlmForCausalLM
from models.llama import LlamaForCausalLM
from tests.tiny import TINY_LLAMA

gguf = pytest.importorskip("gguf")

ARGS = dataclasses.replace(TINY_LLAMA, bos_token_id=1, eos_token_id=2)


def _read(path) -> tuple[gguf.GGUFReader, dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    return reader, {t.name: np.asarray(t.data) for t in reader.tensors}


def _field(reader: gguf.GGUFReader, key: str):
    return reader.get_field(key).contents()


def test_tensors_read_back_with_llama_cpp_names(tmp_path) -> None:
    model = from_seed(LlamaForCausalLM, ARGS, 0, "cpu", torch.float32)
    reader, tensors = _read(write_gguf(model, tmp_path / "m.gguf"))
    layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm"]
    layer += ["ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(ARGS.num_hidden_layers) for n in layer
    }
    assert set(tensors) == expected
    sd = model.state_dict()
    np.testing.assert_array_equal(tensors["token_embd.weight"], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight"], sd["model.layers.1.mlp.down_proj.weight"])  # fmt: skip
    np.testing.assert_array_equal(tensors["blk.0.attn_norm.weight"], sd["model.layers.0.input_layernorm.weight"])  # fmt: skip
    # q and k rows are permuted per head (same multiset of values, different order).
    q = sd["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert not np.array_equal(tensors["blk.0.attn_q.weight"], q)
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"], _rope_permute(q, 4))
    k = sd["model.layers.0.self_attn.k_proj.weight"].numpy()
    np.testing.assert_array_equal(tensors["blk.0.attn_k.weight"], _rope_permute(k, 2))
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == ARGS.num_hidden_layers
    assert _field(reader, "llama.attention.head_count_kv") == ARGS.num_key_value_heads
    assert _field(reader, "llama.embedding_length") == ARGS.hidden_size
    assert _field(reader, "llama.feed_forward_length") == ARGS.intermediate_size
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == ARGS.vocab_size == len(set(tokens))
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert list(tmp_path.iterdir()) == [tmp_path / "m.gguf"]  # no temp file left


def test_tied_head_is_left_to_token_embd(tmp_path) -> None:
    tied = dataclasses.replace(ARGS, tie_word_embeddings=True)
    model = from_seed(LlamaForCausalLM, tied, 0, "cpu", torch.float32)
    _, tensors = _read(write_gguf(model, tmp_path / "m.gguf"))
    assert "output.weight" not in tensors and "token_embd.weight" in tensors


def _rotate_half(x: torch.Tensor, pos: int, theta: float = 10000.0) -> torch.Tensor:
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.cat([pos * inv, pos * inv])
    rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * ang.cos() + rot * ang.sin()


def _rotate_pairs(x: torch.Tensor, pos: int, theta: float = 10000.0) -> torch.Tensor:
    """llama.cpp's LLAMA rope: channels (2i, 2i+1) rotate together by pos * theta^(-2i/d)."""
    d = x.shape[-1]
    ang = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * ang.cos() - b * ang.sin()
    out[..., 1::2] = a * ang.sin() + b * ang.cos()
    return out


def test_rope_permutation_keeps_attention_scores() -> None:
    """HF rotate_half on HF rows and llama.cpp's pair rotation on permuted rows give the
    same q.k score for every head and pair of positions."""
    heads, d, hidden = 3, 8, 16
    wq, wk = torch.randn(heads * d, hidden, dtype=torch.float64), torch.randn(heads * d, hidden, dtype=torch.float64)  # fmt: skip
    x, y = torch.randn(hidden, dtype=torch.float64), torch.randn(hidden, dtype=torch.float64)
    pq = torch.from_numpy(_rope_permute(wq.numpy(), heads))
    pk = torch.from_numpy(_rope_permute(wk.numpy(), heads))
    for i, j in ((5, 2), (17, 17), (40, 0)):
        hf = (_rotate_half((wq @ x).view(heads, d), i) * _rotate_half((wk @ y).view(heads, d), j)).sum(-1)  # fmt: skip
        cpp = (_rotate_pairs((pq @ x).view(heads, d), i) * _rotate_pairs((pk @ y).view(heads, d), j)).sum(-1)  # fmt: skip
        torch.testing.assert_close(cpp, hf)


def test_glm_is_refused_with_what_is_supported(tmp_path) -> None:
    from models.glm import GlmArgs

    args = GlmArgs.from_dict(dataclasses.asdict(TINY_LLAMA))
    model = from_seed(GlmForCausalLM, args, 0, "cpu", torch.float32)
    with pytest.raises(RecipeError, match="converts LlamaForCausalLM checkpoints only"):
        write_gguf(model, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())
