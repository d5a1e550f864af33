"""parallel.tp=auto: the planner (common/parallel/strategy.py) picks the tensor-parallel size
before the config is typed, so every process of a run (main, workers, torchrun ranks) resolves
the same number from the same inputs.

With a hardware spec (configs/hardware/NAME.yaml `spec`: a100_80g_x8, ascend910b_x8) the
planner simulates every size and takes the fastest that holds the workload; without one it
cannot simulate, so it takes the fewest ranks that hold it on this machine's devices.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from omegaconf import OmegaConf, open_dict

from common.core.errors import RecipeError
from common.device.select import resolve_dtype, select_device
from common.io.checkpoint import args_from_hf
from common.io.presets import preset_args
from common.parallel.hardware import Hardware, Link, from_spec
from common.parallel.simulate import Workload
from common.parallel.strategy import choose_tp
from common.quant.formats import WeightFormat, weight_format
from common.quant.scheme import SCHEMES, configured_scheme


def _longest(value: Any) -> int:
    """A workload length: an int, or [lo, hi]."""
    return int(max(value) if OmegaConf.is_list(value) or isinstance(value, list) else value)


def this_machine(device_type: str) -> Hardware:
    """The visible devices with their memory; no performance figures (nothing to simulate)."""
    if device_type == "cpu":
        count, memory = 1, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        module = getattr(torch, device_type)
        count = module.device_count()
        memory = module.get_device_properties(0).total_memory
    link = Link(bandwidth=1.0, latency=0.0)
    return Hardware(f"this {device_type}", count, 1, memory, {}, 1.0, link, link)


def _format(quant: Any) -> WeightFormat:
    """The weight format of the quant section's scheme, with its options (group size, bits)."""
    if quant.weights not in SCHEMES:  # none, or an error that names the choices
        return weight_format(quant.weights)
    return configured_scheme(quant).weight_format()


def resolve_auto_tp(cfg: Any, model_cls: type) -> None:
    """Replace parallel.tp=auto in cfg by the planner's choice (no-op otherwise)."""
    if OmegaConf.select(cfg, "parallel.tp") != "auto":
        return
    model = cfg.model
    dims = OmegaConf.merge(model, {"allow_random_full": True})  # dims only: nothing allocated
    args = args_from_hf(model_cls, model.path) if model.path else preset_args(dims, model_cls)
    spec = OmegaConf.select(cfg, "hardware.spec")
    if spec:  # a planned machine: no need to be on it; accelerators run bf16 natively
        hw = from_spec(cfg.hardware.name or cfg.hardware.device, OmegaConf.to_container(spec))
        dtype = torch.bfloat16 if model.dtype == "auto" else getattr(torch, str(model.dtype), None)
        if not isinstance(dtype, torch.dtype):
            raise RecipeError(f"model.dtype={model.dtype}: not a torch dtype name")
    else:
        device = select_device(cfg.hardware.device)
        hw, dtype = this_machine(device.type), resolve_dtype(model.dtype, device)
    w = cfg.workload
    prompt = OmegaConf.select(w, "prompt_len", default=None)
    if prompt is None:
        raise RecipeError(f"parallel.tp=auto needs a workload with prompt_len; {w.kind} has none")
    workload = Workload(w.batch_size, _longest(prompt), _longest(w.max_new_tokens))
    tp = choose_tp(
        args,
        dtype,
        hw,
        workload,
        _format(cfg.quant),
        bool(cfg.kv_cache.int8),
        pp=int(OmegaConf.select(cfg, "parallel.pp", default=1)),
        simulate_speed=bool(spec),
    )
    with open_dict(cfg):
        cfg.parallel.tp = tp
    print(f"parallel.tp=auto: the planner chose tp={tp} on {hw.name}")
