"""Performance simulation of one parallel strategy: a roofline per pipeline stage plus
communication, giving TTFT, TPOT and throughput without running the model.

A forward on one device of stage s (its tensor-parallel shard of the stage's layers):
- matmuls: max(FLOPs / peak FLOP/s, weight bytes read / memory bandwidth) — every weight is
  read once per forward whatever the rows, and each row costs 2 FLOPs per weight;
- attention: max(4 x rows x new x keys x heads x head_dim / FLOP/s, KV bytes / bandwidth);
- a fixed overhead per decoder layer (kernel launches and dispatch: what the math leaves),
  the prefill's apart where the hardware gives it;
- tensor parallel: two ring all-reduces of the layer's activations per layer (after o_proj
  and down_proj; 2(p-1)/p x bytes / link bandwidth + 2(p-1) hops of latency), one for the
  vocab-parallel embedding, and an all-gather of the last stage's logits;
- pipeline parallel: a send/recv of the activations to the next stage.

Prefill runs the replica's batch as `micro_batches` micro-batches through the stages (fill
and drain: micro_batches + pp - 1 slots of the slowest stage); decode keeps the micro-batches
in flight, so one step of every sequence takes max(micro_batches, pp) slots (pp - micro_batches
of them idle: the bubble). TPOT is the decode step at the mean context of the output; TTFT
the batch's prefill; throughput all replicas' output tokens over their end-to-end time.
Peak FLOP/s and bandwidth are upper bounds: spec-sheet numbers predict a floor on time, and
numbers measured on the machine (calibrate.py) predict the time itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from common.parallel.hardware import Hardware, Link
from common.parallel.layout import Layout, shard
from common.parallel.memory import kv_bytes_per_token, weights_per_device
from common.quant.formats import WeightFormat

if TYPE_CHECKING:
    from common.nn.causal_lm import ModelArgs


@dataclass(frozen=True)
class Strategy:
    tp: int
    pp: int
    dp: int  # data-parallel replicas, each tp x pp devices
    batch: int  # sequences per replica
    scheme: WeightFormat
    kv_int8: bool = False
    micro_batches: int = 1  # pipeline micro-batches per replica batch

    @property
    def layout(self) -> Layout:
        return Layout(self.tp, self.pp)

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.dp

    def label(self) -> str:
        kv = " kv-int8" if self.kv_int8 else ""
        mb = f" mb{self.micro_batches}" if self.pp > 1 else ""
        return f"tp{self.tp} pp{self.pp} dp{self.dp} b{self.batch}{mb} {self.scheme.label()}{kv}"


@dataclass(frozen=True)
class Workload:
    batch: int  # concurrent sequences offered to the whole system
    prompt_len: int
    output_len: int
    ttft_slo: float | None = None  # seconds
    tpot_slo: float | None = None  # seconds


@dataclass(frozen=True)
class Cost:
    """Seconds of one forward on one device, by cause."""

    matmul: float
    attention: float
    overhead: float
    comm: float
    memory_bound: bool  # matmuls limited by weight reads, not FLOPs

    @property
    def total(self) -> float:
        return self.matmul + self.attention + self.overhead + self.comm


@dataclass(frozen=True)
class Simulation:
    strategy: Strategy
    ttft: float  # seconds
    tpot: float  # seconds
    throughput: float  # output tokens/s of all replicas
    decode: Cost  # the slowest stage's decode forward of one micro-batch
    bubble: float  # share of decode slots a stage idles

    def meets(self, w: Workload) -> bool:
        return (w.ttft_slo is None or self.ttft <= w.ttft_slo) and (
            w.tpot_slo is None or self.tpot <= w.tpot_slo
        )


def all_reduce_time(nbytes: float, ranks: int, link: Link) -> float:
    """Ring all-reduce: a reduce-scatter and an all-gather, each p - 1 steps of bytes / p."""
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / link.bandwidth + 2 * (ranks - 1) * link.latency


def all_gather_time(nbytes: float, ranks: int, link: Link) -> float:
    """Ring all-gather of `nbytes` in total (each rank contributes nbytes / ranks)."""
    if ranks == 1:
        return 0.0
    return (ranks - 1) / ranks * nbytes / link.bandwidth + (ranks - 1) * link.latency


def send_time(nbytes: float, link: Link) -> float:
    return nbytes / link.bandwidth + link.latency


def _stage_link(hw: Hardware, tp: int, stage: int) -> Link:
    """The link from `stage` to the next: devices are numbered tensor-parallel rank first,
    so stage s holds devices [s * tp, (s + 1) * tp) of its replica."""
    last_here, first_next = (stage + 1) * tp - 1, (stage + 1) * tp
    same = last_here // hw.devices_per_node == first_next // hw.devices_per_node
    return hw.intra if same else hw.inter


def forward_cost(
    args: ModelArgs,
    dtype: torch.dtype,
    st: Strategy,
    stage: int,
    rows: int,
    new: int,
    context: int,
    hw: Hardware,
    kv_passes: float = 1.0,
) -> Cost:
    """One device of `stage`: `rows` sequences of `new` tokens each, seeing `context` keys
    (new ones included). kv_passes: times the cached KV moves per forward (1: attention
    reads it; 3: a cache grown by torch.cat also reads and writes it)."""
    layout, fmt = st.layout, st.scheme
    s = shard(args, layout)
    layers, last, first = s.stage_layers[stage], stage == st.pp - 1, stage == 0
    h, d, e = args.hidden_size, args.kv_head_dim, dtype.itemsize
    tokens = rows * new
    flops_per = hw.compute(dtype, fmt.name)
    # Matmuls: every layer's projections on all tokens; the head on each row's last token.
    layer_params = h * (2 * s.heads * d + 2 * s.kv_heads * d) + 3 * h * s.intermediate
    head_params = s.vocab * h if last else 0
    flops = 2 * (layers * layer_params * tokens + head_params * rows)
    weights = weights_per_device(args, dtype, fmt, layout, stage).decode_read
    compute_s, read_s = flops / flops_per, weights / hw.mem_bw
    # Attention: causal prefill sees on average context - new / 2 keys per new token.
    keys = context - (new - 1) / 2
    attn_flops = 4 * tokens * keys * s.heads * d * layers
    kv_bytes = (
        kv_passes * rows * context * kv_bytes_per_token(args, dtype, st.kv_int8, layout, stage)
    )
    attention = max(attn_flops / flops_per, kv_bytes / hw.mem_bw)
    # Communication: per layer two all-reduces of [tokens, hidden]; embedding and logits.
    tp_link = hw.link(st.tp)
    act = tokens * h * e
    comm = 2 * layers * all_reduce_time(act, st.tp, tp_link)
    if first:
        comm += all_reduce_time(act, st.tp, tp_link)  # vocab-parallel embedding
    if last:
        comm += all_gather_time(rows * s.vocab * st.tp * e, st.tp, tp_link)  # the logits
    else:
        comm += send_time(act, _stage_link(hw, st.tp, stage))
    return Cost(
        matmul=max(compute_s, read_s),
        attention=attention,
        overhead=hw.overhead(prefill=new > 1) * (layers + last),
        comm=comm,
        memory_bound=read_s >= compute_s,
    )


def simulate(
    args: ModelArgs,
    dtype: torch.dtype,
    st: Strategy,
    w: Workload,
    hw: Hardware,
    kv_passes: float = 1.0,
) -> Simulation:
    """TTFT, TPOT and throughput of `st` serving `w` on `hw` (see the module docstring)."""
    m = max(1, min(st.micro_batches, st.batch))
    rows = -(-st.batch // m)  # rows per micro-batch

    def slowest(new: int, context: int) -> Cost:
        costs = [
            forward_cost(args, dtype, st, s, rows, new, context, hw, kv_passes)
            for s in range(st.pp)
        ]
        return max(costs, key=lambda c: c.total)

    prefill = slowest(w.prompt_len, w.prompt_len)
    ttft = (m + st.pp - 1) * prefill.total
    decode = slowest(1, w.prompt_len + (w.output_len + 1) // 2)
    slots = max(m, st.pp)
    tpot = slots * decode.total
    e2e = ttft + (w.output_len - 1) * tpot
    return Simulation(
        strategy=st,
        ttft=ttft,
        tpot=tpot,
        throughput=st.dp * st.batch * w.output_len / e2e,
        decode=decode,
        bubble=1 - m / slots,
    )
