"""Kernels as registered torch ops (llm_recipes::*), each op's implementation chosen per
machine by a short measurement (dispatch.py). Model code calls these entry points only."""

from common.ops.attention import decode_attention
from common.ops.dispatch import chosen, pin, reset
from common.ops.int4_linear import int4_linear
from common.ops.int8_linear import int8_linear
from common.ops.rms_norm import rms_norm

__all__ = ["chosen", "decode_attention", "int4_linear", "int8_linear", "pin", "reset", "rms_norm"]
