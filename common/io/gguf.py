"""Write our model's weights as a GGUF file that llama.cpp runs (the llama_cpp peer).

The file is written directly with the `gguf` package's GGUFWriter, for any checkpoint
(seeded or real): llama.cpp's hyper-parameter keys, its tensor names, and a placeholder
vocabulary of the right size (the benchmark feeds token ids, so no tokenizer is needed).
Weights go out in float32; llama.cpp's own quantizer then makes bf16 / q8_0 / q4_0 from it,
exactly as a llama.cpp user would (common/bench/peers.py).

Rotary: HF LLaMA checkpoints rotate the two halves of each head (rotate_half); llama.cpp's
"llama" arch rotates adjacent pairs. Its converter permutes the rows of q and k (weights and
biases) so that the two layouts give the same attention; so does `_rope_permute`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from common.core.errors import RecipeError
from common.nn.causal_lm import CausalLM, ModelArgs

# HF parameter name (after "model.layers.N.") -> llama.cpp tensor name (after "blk.N.").
LLAMA_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
LLAMA_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
SUPPORTED = ("LlamaForCausalLM",)


def check_supported(model_cls: type[CausalLM], args: ModelArgs) -> None:
    """One line naming what the GGUF writer converts, before anything is written."""
    if model_cls.hf_class_name not in SUPPORTED:
        raise RecipeError(
            f"the llama_cpp peer converts {', '.join(SUPPORTED)} checkpoints only, not "
            f"{model_cls.hf_class_name} (llama.cpp runs GLM-4 as its own 'chatglm' arch, "
            "with fused QKV and partial rotary); use bench.peers=[hf] or [vllm] for it"
        )
    if getattr(args, "rope_scaling", None):
        raise RecipeError(
            "the llama_cpp peer does not convert rope_scaling "
            f"{args.rope_scaling}; it converts LLaMA checkpoints with plain rotary"
        )


def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate_half row order -> llama.cpp's interleaved pairs, per head (llama.cpp's
    convert_hf_to_gguf.py `permute`): rows [h, 2, d/2] become [h, d/2, 2]."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name(hf_name: str) -> str:
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight."""
    module, _, leaf = hf_name.rpartition(".")
    if module in LLAMA_TOP:
        return f"{LLAMA_TOP[module]}.{leaf}"
    parts = module.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in LLAMA_LAYER:
        return f"blk.{parts[2]}.{LLAMA_LAYER['.'.join(parts[3:])]}.{leaf}"
    raise RecipeError(f"no llama.cpp name for tensor {hf_name!r}")


def gguf_tensors(model: CausalLM) -> Iterator[tuple[str, np.ndarray]]:
    """(llama.cpp name, float32 array) for every tensor llama.cpp reads; a tied LM head is
    left out (llama.cpp then uses token_embd for the output, as for tied HF checkpoints)."""
    args = model.args
    for name, t in model.state_dict().items():
        if name in model.tied_weights:
            continue
        w = t.detach().to("cpu", torch.float32).numpy()
        if ".q_proj." in name:
            w = _rope_permute(w, args.num_attention_heads)
        elif ".k_proj." in name:
            w = _rope_permute(w, args.num_key_value_heads)
        yield gguf_name(name), w


def placeholder_vocab(args: ModelArgs) -> tuple[list[str], list[int]]:
    """vocab_size distinct tokens: <unk> at 0, the config's BOS/EOS as control tokens."""
    from gguf import TokenType

    tokens = [f"<t{i}>" for i in range(args.vocab_size)]
    types = [int(TokenType.NORMAL)] * args.vocab_size
    tokens[0], types[0] = "<unk>", int(TokenType.UNKNOWN)
    for i, text in ((args.bos_token_id, "<s>"), *((e, f"</s{e}>") for e in args.eos_ids)):
        if i is not None and 0 < i < args.vocab_size:
            tokens[i], types[i] = text, int(TokenType.CONTROL)
    return tokens, types


def write_gguf(model: CausalLM, path: Path) -> Path:
    """Write `model` as a float32 GGUF at `path` (atomically: no partial file on failure)."""
    import gguf

    args = model.args
    check_supported(type(model), args)
    head_dim = args.kv_head_dim
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    try:
        w.add_name("llm-recipes export")
        w.add_context_length(args.max_position_embeddings)
        w.add_embedding_length(args.hidden_size)
        w.add_block_count(args.num_hidden_layers)
        w.add_feed_forward_length(args.intermediate_size)
        w.add_head_count(args.num_attention_heads)
        w.add_head_count_kv(args.num_key_value_heads)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(float(args.rope_theta))
        w.add_layer_norm_rms_eps(float(args.rms_norm_eps))
        w.add_vocab_size(args.vocab_size)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        tokens, types = placeholder_vocab(args)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([0.0] * len(tokens))
        w.add_token_types(types)
        w.add_unk_token_id(0)
        if args.bos_token_id is not None and args.bos_token_id < args.vocab_size:
            w.add_bos_token_id(args.bos_token_id)
        if args.eos_ids and args.eos_ids[0] < args.vocab_size:
            w.add_eos_token_id(args.eos_ids[0])
        w.add_add_bos_token(False)  # prompts are token ids, used as given
        for name, array in gguf_tensors(model):
            w.add_tensor(name, array)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
