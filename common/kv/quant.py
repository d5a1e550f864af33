"""int8 KV storage: K/V stores that are plain tensors or QuantizedKV (the format kernels read,
common/ops/kv_int8.py), written through quantize_kv and read back through dequantize_kv."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from common.ops.kv_int8 import SCALE_DTYPE, QuantizedKV, dequantize_kv, quantize_kv

KVTensor = Tensor | QuantizedKV  # a K or V store: plain (model dtype) or int8


def kv_zeros(shape: tuple[int, ...], dtype: torch.dtype, int8: bool, device) -> KVTensor:
    if not int8:
        return torch.zeros(shape, dtype=dtype, device=device)
    scale = torch.zeros((*shape[:-1], 1), dtype=SCALE_DTYPE, device=device)
    return QuantizedKV(torch.zeros(shape, dtype=torch.int8, device=device), scale)


def kv_write(store: KVTensor, index: tuple, x: Tensor) -> None:
    if isinstance(store, QuantizedKV):
        store.data[index], store.scale[index] = quantize_kv(x)
    else:
        store[index] = x


def kv_read(store: KVTensor, index: tuple, dtype: torch.dtype) -> Tensor:
    if isinstance(store, QuantizedKV):
        return dequantize_kv(store.data[index], store.scale[index], dtype)
    return store[index]


def kv_nbytes(store: KVTensor) -> int:
    return (
        store.data.nbytes + store.scale.nbytes if isinstance(store, QuantizedKV) else store.nbytes
    )


def kv_parts(store: KVTensor) -> tuple[Tensor, ...]:
    """The tensors holding a store: (data, scale) for int8, else the tensor itself."""
    return tuple(store) if isinstance(store, QuantizedKV) else (store,)


def kv_map(store: KVTensor, fn: Callable[[Tensor], Tensor]) -> KVTensor:
    """Apply fn to the data (and the scale) tensor: views, slices, copies."""
    return (
        QuantizedKV(fn(store.data), fn(store.scale))
        if isinstance(store, QuantizedKV)
        else fn(store)
    )
