"""LLaMA (1/2/3): RMSNorm pre-norm decoder, rotary (incl. llama3 scaling), GQA, SwiGLU.

Parameter names match transformers' LlamaForCausalLM, so HF checkpoints load as-is.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from common.nn.causal_lm import CausalLM, ModelArgs, pre_norm_decoder
from common.nn.decoder import DecoderModel
from common.nn.mlp import GatedMLP
from common.nn.rotary import RotaryEmbedding


@dataclass(frozen=True)
class LlamaArgs(ModelArgs):
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def biases(self) -> tuple[bool, bool, bool]:
        return self.attention_bias, self.attention_bias, self.mlp_bias

    @classmethod
    def from_hf_config(cls, d: dict) -> LlamaArgs:
        # transformers >= 5 nests theta and scaling in rope_parameters; older configs do not.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        d = {**d, "rope_theta": rope.pop("rope_theta", d.get("rope_theta", 10000.0))}
        d["rope_scaling"] = (
            rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        )
        return cls.from_dict(d)

    def to_hf_config(self) -> dict:
        """The transformers LlamaConfig kwargs for these dims (oracle tests, HF peer, saving)."""
        d = {k: v for k, v in self.__dict__.items() if k not in ("rope_scaling", "rope_theta")}
        d["head_dim"] = self.kv_head_dim
        d["rope_parameters"] = {
            "rope_type": "default",
            **(self.rope_scaling or {}),
            "rope_theta": self.rope_theta,
        }
        return d


def llama_model(args: LlamaArgs) -> DecoderModel:
    rotary = RotaryEmbedding(args.kv_head_dim, args.rope_theta, args.rope_scaling)
    qkv_bias, o_bias, mlp_bias = args.biases
    mlp = lambda: GatedMLP(args.hidden_size, args.intermediate_size, bias=mlp_bias)  # noqa: E731
    return pre_norm_decoder(args, rotary, mlp, args.rms_norm_eps, qkv_bias=qkv_bias, o_bias=o_bias)


class LlamaForCausalLM(CausalLM):
    args_cls = LlamaArgs
    hf_class_name = "LlamaForCausalLM"

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__(args)
        self.model = llama_model(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
