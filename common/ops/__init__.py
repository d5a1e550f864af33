"""Kernels as registered torch ops (llm_recipes::*), each op's implementation chosen per
machine by a short measurement (dispatch.py). Model code calls these entry points only."""

from common.ops.attention import decode_attention
from common.ops.bf16_linear import bf16_linear
from common.ops.dispatch import chosen, pin, reset
from common.ops.int4_linear import int4_linear
from common.ops.int8_linear import int8_linear
from common.ops.rms_norm import add_rms_norm, rms_norm
from common.ops.rotary import apply_rotary, rotary
from common.ops.w4a8_linear import w4a8_linear
from common.ops.w8a8_linear import w8a8_linear

__all__ = [
    "add_rms_norm",
    "apply_rotary",
    "bf16_linear",
    "chosen",
    "decode_attention",
    "int4_linear",
    "int8_linear",
    "pin",
    "reset",
    "rms_norm",
    "rotary",
    "w4a8_linear",
    "w8a8_linear",
]
