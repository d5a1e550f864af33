"""Everything a run can get wrong, checked once before any worker starts.

The typed config (common/core/config.py) checks keys, types and ranges; this module adds
what needs a package above core: the device, the opts as combinations, the model for this
recipe, the requests the workload builds, and each choice against its package's own list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf

import common.attention.paged  # noqa: F401  registers the paged_attention op, so its pin is checked
from common import ops
from common.attention.backends import get_backend
from common.bench.peers import PEERS
from common.bench.plan import Variant, plan
from common.bench.worker import kv_spec, pinned_kernels
from common.bench.workload import arrival_times, build_requests
from common.core.config import CONFIG_DIR, ModelConfig, RecipeConfig, models_for, typed
from common.core.errors import RecipeError
from common.core.request import SamplingParams
from common.device.select import Device, resolve_dtype, select_device
from common.engine.scheduler import KINDS, POLICIES, PREEMPTIONS
from common.io.checkpoint import args_from_hf
from common.io.presets import load_tokenizer, preset_args
from common.nn.causal_lm import CausalLM, ModelArgs
from common.quant.scheme import configured_scheme
from common.quant.skip import skip_filter
from common.transforms.fusion import fuse_projections
from common.transforms.registry import check_opts_supported, opt_specs

_ABSENT = object()


@dataclass(frozen=True)
class Checked:
    config: RecipeConfig
    device: Device
    variants: list[Variant]


def _choice(key: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise RecipeError(f"unknown {key} {value!r}; choose one of {', '.join(choices)}")


def _model_args(model: Any, model_cls: type[CausalLM]) -> ModelArgs:
    """The model this run builds, without its weights; another recipe's model is an error."""
    if model.architecture != model_cls.hf_class_name:
        fits = models_for(model_cls.hf_class_name)
        raise RecipeError(
            f"model {model.name!r} ({model.architecture}) does not run in this recipe, "
            f"which runs {model_cls.hf_class_name}; choose model={' or model='.join(fits)}"
        )
    if model.path:
        return args_from_hf(model_cls, model.path)  # a missing dir or bad config.json fails here
    return preset_args(model, model_cls)


def _check_choices(cfg: Any, config: RecipeConfig, device: Device) -> None:
    get_backend(config.attention.backend, device, paged=config.kv_cache.kind == "paged")
    _choice("scheduler.kind", config.scheduler.kind, KINDS)
    _choice("scheduler.policy", config.scheduler.policy, POLICIES)
    _choice("scheduler.preemption", config.scheduler.preemption, PREEMPTIONS)
    for peer in config.bench.peers:
        _choice("bench.peers entry", peer, PEERS)
    SamplingParams(**cfg.generation)
    if config.quant.weights != "none":
        configured_scheme(config.quant)
    ops.pin(pinned_kernels(cfg))  # an unknown implementation names the op's choices


def _check_requests(cfg: Any, model: ModelConfig, args: ModelArgs) -> None:
    """Build the workload's requests as the workers will: a bad prompt file line, a zero
    count or length fails here."""
    tokenizer = load_tokenizer(model.path) if model.path and cfg.workload.kind == "file" else None
    requests = build_requests(cfg.workload, args.vocab_size, tokenizer)
    arrival_times(cfg.workload, len(requests))


def _check_skip(config: RecipeConfig, model_cls: type[CausalLM], args: ModelArgs) -> None:
    """quant.skip names modules of this model (built on the meta device: no memory)."""
    if config.quant.skip:
        with torch.device("meta"):
            model = model_cls(args)
        if config.fusion.projections:
            fuse_projections(model)
        skip_filter(model, list(config.quant.skip))


def preflight(cfg: Any, model_cls: type[CausalLM]) -> Checked:
    config = typed(cfg)
    device = select_device(config.hardware.device)
    check_opts_supported(cfg.opts, device)
    resolve_dtype(config.model.dtype, device)
    _check_choices(cfg, config, device)
    args = _model_args(cfg.model, model_cls)
    _check_requests(cfg, config.model, args)
    _check_skip(config, model_cls, args)
    opts = list(config.opts)
    rows = config.bench.variants
    if rows and opts:
        raise RecipeError(
            "give the rows either as +opt=... or as bench.variants=[[...], ...], not both"
        )
    specs = {**opt_specs(CONFIG_DIR), **config.opts}
    variants = plan(opts, config.bench.ladder, config.bench.each, config.bench.peers, rows, specs)
    if not config.bench.each:  # the combined variant must be a valid KV choice
        kv_spec(cfg)
    for v in variants:
        _check_overrides(cfg, v.overrides)
    return Checked(config, device, variants)


def _check_overrides(cfg: Any, overrides: list[str]) -> None:
    """A row's KEY=VALUE settings: existing keys, values of the right type and range."""
    if not overrides:
        return
    for item in overrides:
        key = item.partition("=")[0]
        if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            raise RecipeError(f"bench.variants override {item!r}: unknown config key {key!r}")
    typed(OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides)))
