"""GLM-4 (glm-4-9b-chat-hf layout, transformers' GlmForCausalLM): the ChatGLM family today.

A LLaMA-style pre-norm decoder that differs in three places: rotary on the first
`partial_rotary_factor` of each head's channels in the interleaved layout, biased q/k/v
(o_proj unbiased), and a fused gate_up MLP. Parameter names match transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from common.core.errors import RecipeError
from common.nn.causal_lm import CausalLM, ModelArgs, pre_norm_decoder
from common.nn.decoder import DecoderModel
from common.nn.mlp import FusedGatedMLP
from common.nn.rotary import InterleavedRotaryEmbedding


@dataclass(frozen=True)
class GlmArgs(ModelArgs):
    rms_norm_eps: float = 1.5625e-07
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    attention_bias: bool = True
    pad_token_id: int | None = None  # unused by inference; kept so configs round-trip

    @property
    def biases(self) -> tuple[bool, bool, bool]:
        return self.attention_bias, False, False  # GLM-4 biases q/k/v only

    @property
    def rotary_dim(self) -> int:
        return int(self.kv_head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf_config(cls, d: dict) -> GlmArgs:
        if d.get("model_type", "glm") != "glm":  # e.g. "chatglm": THUDM's remote-code layout
            raise RecipeError(
                f"config.json has model_type {d['model_type']!r}; this model loads the "
                "transformers GLM layout (model_type 'glm', e.g. THUDM/glm-4-9b-chat-hf)"
            )
        # transformers >= 5 nests theta and the rotary fraction in rope_parameters; the
        # published glm-4-9b-chat-hf config.json keeps them top level, scaling in rope_scaling.
        rope = {**d, **(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise RecipeError(f"GLM: unsupported rope_type {kind!r}; supported: default")
        return cls.from_dict(
            {
                **d,
                "rope_theta": rope.get("rope_theta", cls.rope_theta),
                "partial_rotary_factor": rope.get(
                    "partial_rotary_factor", cls.partial_rotary_factor
                ),
            }
        )

    def to_hf_config(self) -> dict:
        """The transformers GlmConfig kwargs for these dims (oracle tests, HF peer)."""
        rope = ("rope_theta", "partial_rotary_factor")
        d = {k: v for k, v in self.__dict__.items() if k not in rope}
        d["head_dim"] = self.kv_head_dim  # GlmConfig defaults head_dim to 128, not hidden/heads
        d["rope_parameters"] = {"rope_type": "default", **{k: self.__dict__[k] for k in rope}}
        return d


def glm_model(args: GlmArgs) -> DecoderModel:
    rotary = InterleavedRotaryEmbedding(args.rotary_dim, args.rope_theta)
    mlp = lambda: FusedGatedMLP(args.hidden_size, args.intermediate_size)  # noqa: E731
    qkv_bias, o_bias, _ = args.biases
    return pre_norm_decoder(args, rotary, mlp, args.rms_norm_eps, qkv_bias=qkv_bias, o_bias=o_bias)


class GlmForCausalLM(CausalLM):
    args_cls = GlmArgs
    hf_class_name = "GlmForCausalLM"

    def __init__(self, args: GlmArgs) -> None:
        super().__init__(args)
        self.model = glm_model(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
