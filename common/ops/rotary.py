"""Rotary position embeddings applied to x [B, H, T, D] with cos/sin [B, T, rot] (the first
rot channels of each head rotate, the rest pass through), in the two layouts: rotate-half
(LLaMA, GPT-NeoX) and adjacent pairs (GPT-J, GLM).

`apply_rotary` is the torch math the model runs unfused (about eight small ops per tensor).
`rotary(q, k, cos, sin, interleaved)` is the dispatched op the fuse opt calls: q and k in
one call, three ways: a C++ kernel (rotary.cpp: one pass over both, same roundings as the
torch ops, so bit for bit equal), the torch math, and torch_npu's npu_rotary_mul on q and k
stacked (unverified).
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.ops.dispatch import Impl, Op
from common.ops.library import kernel_op

_DTYPES = (torch.float32, torch.bfloat16)  # what the C++ kernels take


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_interleaved(x: Tensor) -> Tensor:
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """x [B, H, T, D]; cos/sin [B, T, rot] rotate the first rot channels."""
    cos, sin = cos[:, None], sin[:, None]
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    rotated = (rotate_interleaved if interleaved else rotate_half)(x_rot)
    out = x_rot * cos + rotated * sin
    return out if x_pass.shape[-1] == 0 else torch.cat((out, x_pass), dim=-1)


def rotary_torch(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool
) -> tuple[Tensor, Tensor]:
    return apply_rotary(q, cos, sin, interleaved), apply_rotary(k, cos, sin, interleaved)


def _check(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool
) -> tuple[Tensor, Tensor]:
    b, _, t, d = q.shape
    rot = cos.shape[-1]
    if (
        q.dtype not in _DTYPES
        or not all(x.dtype == q.dtype for x in (k, cos, sin))
        or k.shape[0] != b
        or k.shape[2:] != q.shape[2:]
        or cos.shape != (b, t, rot)
        or sin.shape != cos.shape
        or rot > d
        or rot % 2
    ):
        raise ValueError(
            f"rotary_cpp: q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, "
            f"cos/sin {tuple(cos.shape)} {cos.dtype}"
        )
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(
        k.shape, dtype=k.dtype, device=k.device
    )


# The C++ kernel (rotary.cpp): q [B, H, T, D] and k [B, Hkv, T, D] in any strides with unit
# stride over D (views of the projection's output) -> contiguous rotated copies.
rotary_cpp = kernel_op("rotary", "rotary_cpp", _check)


def rotary_npu(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool
) -> tuple[Tensor, Tensor]:
    import torch_npu  # unverified: no NPU in CI

    rot, heads = cos.shape[-1], q.shape[1]
    x = torch.cat((q, k), dim=1)  # one kernel call for both
    mode = "interleave" if interleaved else "half"
    out = torch_npu.npu_rotary_mul(x[..., :rot], cos[:, None], sin[:, None], rotary_mode=mode)
    if rot < x.shape[-1]:
        out = torch.cat((out, x[..., rot:]), dim=-1)
    return out[:, :heads], out[:, heads:]


rotary = Op(
    "rotary",
    [
        Impl(
            "cpp",
            rotary_cpp,
            devices=("cpu",),
            dtypes=_DTYPES,
            cpp="rotary",
            when=lambda q, k, cos, sin, interleaved: cos.dtype == q.dtype == k.dtype,
        ),
        Impl("npu", rotary_npu, devices=("npu",)),
        Impl("torch", rotary_torch),
    ],
    rows=lambda q, k, cos, sin, interleaved: q.shape[0] * q.shape[2],  # tokens
    size=lambda q, k, cos, sin, interleaved: (q[0].numel() + k[0].numel()) * q.element_size(),
)
