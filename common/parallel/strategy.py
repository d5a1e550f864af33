"""The auto-parallel planner: generate strategies, drop those that do not fit, simulate the
rest, rank them (scripts/plan.py strategy; parallel.tp=auto).

Strategy generation -> memory check (common/parallel/calculator.py) -> performance
simulation (common/parallel/simulate.py) -> ranking, as CANN's automatic partitioning
iterates them. Candidates: tensor-parallel ranks (powers of two that divide the heads and
fit a node), pipeline stages, data-parallel replicas filling the devices, sequences per
replica (powers of two up to the workload's share), weight schemes and KV dtypes. Ranking:
strategies that meet the SLO first, by throughput; then the rest by TPOT. Each top plan
carries the reason it wins: what bounds it and what it beats the next plan by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from common.core.errors import RecipeError
from common.parallel.calculator import Serving, peak_bytes
from common.parallel.hardware import Hardware
from common.parallel.layout import Layout, shard
from common.parallel.simulate import Simulation, Strategy, Workload, simulate
from common.quant.formats import WeightFormat

if TYPE_CHECKING:
    from common.nn.causal_lm import ModelArgs


@dataclass(frozen=True)
class Plan:
    sim: Simulation
    peak_bytes: int  # the fullest device's bytes
    meets_slo: bool
    reason: str = ""


def _powers_of_two(limit: int) -> list[int]:
    return [1 << i for i in range(limit.bit_length()) if 1 << i <= limit]


def _valid_layout(args: ModelArgs, tp: int, pp: int) -> bool:
    try:
        shard(args, Layout(tp, pp))
    except RecipeError:
        return False
    return True


def candidates(
    args: ModelArgs,
    hw: Hardware,
    w: Workload,
    schemes: list[WeightFormat],
    kv_int8: list[bool],
    tp: list[int] | None = None,
    pp: list[int] | None = None,
) -> list[Strategy]:
    """Every strategy to try. tp and pp restrict the search (None: all that fit the machine)."""
    out = []
    for t in tp or _powers_of_two(hw.devices):
        for p in pp or _powers_of_two(hw.devices // t):
            if t * p > hw.devices or not _valid_layout(args, t, p):
                continue
            for dp in range(1, hw.devices // (t * p) + 1):
                for b in _powers_of_two(-(-w.batch // dp)):
                    for fmt in schemes:
                        for kv in kv_int8:
                            out.append(Strategy(t, p, dp, b, fmt, kv, micro_batches=min(p, b)))
    return out


def plan(
    args: ModelArgs,
    dtype: torch.dtype,
    hw: Hardware,
    w: Workload,
    schemes: list[WeightFormat],
    kv_int8: list[bool],
    tp: list[int] | None = None,
    pp: list[int] | None = None,
    other_params: int = 0,
    kv_passes: float = 1.0,
) -> tuple[list[Plan], int]:
    """(plans that fit, best first; how many candidates did not fit)."""
    budget = int(hw.memory * hw.usable_memory)
    fits, dropped = [], 0
    for st in candidates(args, hw, w, schemes, kv_int8, tp, pp):
        serving = Serving(dtype, st.scheme, st.kv_int8, st.layout, other_params=other_params)
        peak = peak_bytes(args, serving, st.batch, w.prompt_len + w.output_len)
        if peak > budget:
            dropped += 1
            continue
        sim = simulate(args, dtype, st, w, hw, kv_passes)
        fits.append(Plan(sim, peak, sim.meets(w)))
    return rank(fits), dropped


def rank(plans: list[Plan]) -> list[Plan]:
    """SLO-meeting plans by throughput (fewer devices, then lower TPOT on ties), then the
    others by TPOT; each with the reason it is where it is."""

    def key(p: Plan) -> tuple:
        s = p.sim
        if p.meets_slo:
            return (0, -round(s.throughput, 6), s.strategy.devices, s.tpot)
        return (1, s.tpot, -s.throughput)

    ordered = sorted(plans, key=key)
    return [
        Plan(p.sim, p.peak_bytes, p.meets_slo, _reason(p, ordered[i + 1 : i + 2]))
        for i, p in enumerate(ordered)
    ]


def _reason(p: Plan, runner_up: list[Plan]) -> str:
    s, c = p.sim, p.sim.decode
    parts = [
        f"decode {'memory' if c.memory_bound else 'compute'}-bound"
        f" ({1e3 * c.matmul:.2f} ms matmuls, {1e3 * c.attention:.2f} ms attention"
        f", {1e3 * c.comm:.2f} ms comm, {1e3 * c.overhead:.2f} ms overhead per stage step)"
    ]
    if s.bubble > 0:
        parts.append(f"pipeline bubble {100 * s.bubble:.0f}%")
    parts.append("meets the SLO" if p.meets_slo else "misses the SLO")
    if runner_up:
        r = runner_up[0].sim
        if p.meets_slo and runner_up[0].meets_slo:
            parts.append(
                f"{s.throughput / r.throughput:.2f}x the throughput of {r.strategy.label()}"
            )
        elif p.meets_slo:
            parts.append(f"next plan {r.strategy.label()} misses the SLO")
        else:
            parts.append(f"TPOT {s.tpot / r.tpot:.2f}x of {r.strategy.label()}")
    return "; ".join(parts)


def choose_tp(
    args: ModelArgs,
    dtype: torch.dtype,
    hw: Hardware,
    w: Workload,
    scheme: WeightFormat,
    kv_int8: bool,
    pp: int = 1,
    simulate_speed: bool = True,
) -> int:
    """parallel.tp=auto: the tensor-parallel size of the best plan that serves the whole
    workload batch in one replica of `pp` stages with the run's scheme and KV dtype; without
    performance figures (simulate_speed=False), the fewest ranks that hold it."""
    if simulate_speed:
        plans, _ = plan(args, dtype, hw, w, [scheme], [kv_int8], pp=[pp])
        whole = [
            p.sim.strategy.tp
            for p in plans
            if p.sim.strategy.dp == 1 and p.sim.strategy.batch == w.batch
        ]
    else:
        budget = hw.memory * hw.usable_memory
        whole = [
            t
            for t in _powers_of_two(hw.devices // pp)
            if _valid_layout(args, t, pp)
            and peak_bytes(
                args,
                Serving(dtype, scheme, kv_int8, Layout(t, pp)),
                w.batch,
                w.prompt_len + w.output_len,
            )
            <= budget
        ]
    if not whole:
        raise RecipeError(
            f"parallel.tp=auto: no tensor-parallel size up to {hw.devices // pp} devices of "
            f"{hw.name} holds batch {w.batch} at {w.prompt_len}+{w.output_len} tokens; "
            "lower the batch or quantize (quant.weights, kv_cache.int8)"
        )
    return whole[0]
