"""What the planner knows of a machine: devices per node, nodes, and per device its memory,
peak compute per dtype, memory bandwidth and per-layer overhead (decode, and prefill
where it was measured apart); links inside and across nodes.

Read from the `spec` section of configs/hardware/NAME.yaml (public spec-sheet numbers), or
measured on this machine (common/parallel/calibrate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from common.core.errors import RecipeError

GB = 1e9
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s one device sends (and receives) at once, per direction
    latency: float  # seconds per message hop


@dataclass(frozen=True)
class Hardware:
    name: str
    devices_per_node: int
    nodes: int
    memory: int  # bytes per device
    flops: dict[str, float]  # peak (dense) FLOP/s per device by dtype: bf16, fp16, fp32, int8
    mem_bw: float  # bytes/s per device
    intra: Link  # between devices of one node
    inter: Link  # between nodes (per device)
    layer_overhead: float = (
        0.0  # seconds per decoder layer and forward beyond its math (launches, dispatch)
    )
    prefill_overhead: float | None = None  # the same for a prefill forward; None: layer_overhead
    usable_memory: float = 0.9  # share of memory a plan may fill (runtime, allocator slack)
    notes: list[str] = field(default_factory=list)

    @property
    def devices(self) -> int:
        return self.devices_per_node * self.nodes

    def compute(self, dtype: torch.dtype, scheme: str = "none") -> float:
        """FLOP/s of the matmuls: int8 tensor cores for W8A8 and W4A8 (int8 activations), the
        activation dtype otherwise (weight-only schemes dequantize into it)."""
        int8 = scheme in ("w8a8", "w4a8") and "int8" in self.flops
        key = "int8" if int8 else DTYPE_NAMES[dtype]
        if key not in self.flops:
            raise RecipeError(f"hardware {self.name} gives no {key} FLOP/s; add flops.{key}")
        return self.flops[key]

    def overhead(self, prefill: bool) -> float:
        """Seconds per decoder layer beyond the math, of a prefill or a decode forward."""
        if prefill and self.prefill_overhead is not None:
            return self.prefill_overhead
        return self.layer_overhead

    def link(self, ranks: int) -> Link:
        """The slowest link a group of `ranks` consecutive devices uses."""
        return self.intra if ranks <= self.devices_per_node else self.inter


def from_spec(name: str, spec: dict[str, Any]) -> Hardware:
    """A configs/hardware YAML's `spec` section: GB, GB/s, TFLOP/s and microseconds."""
    try:
        return Hardware(
            name=name,
            devices_per_node=int(spec["devices_per_node"]),
            nodes=int(spec.get("nodes", 1)),
            memory=int(float(spec["memory_gb"]) * GB),
            flops={k: float(v) * 1e12 for k, v in spec["tflops"].items()},
            mem_bw=float(spec["mem_bw_gbs"]) * GB,
            intra=_link(spec["intra_node"]),
            inter=_link(spec.get("inter_node", spec["intra_node"])),
            layer_overhead=float(spec.get("layer_overhead_us", 0.0)) * 1e-6,
            usable_memory=float(spec.get("usable_memory", 0.9)),
        )
    except KeyError as e:
        raise RecipeError(f"hardware {name}: spec lacks {e.args[0]}") from e


def _link(d: dict[str, Any]) -> Link:
    return Link(bandwidth=float(d["bw_gbs"]) * GB, latency=float(d["latency_us"]) * 1e-6)
