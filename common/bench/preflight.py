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
from common.bench.peers import PEERS, check_peer
from common.bench.plan import Variant, plan
from common.bench.worker import beam_config, kv_spec, pinned_kernels, spec_config
from common.bench.workload import arrival_times, build_requests
from common.core.config import CONFIG_DIR, ModelConfig, RecipeConfig, models_for, typed
from common.core.errors import RecipeError
from common.core.request import Request, SamplingParams
from common.device.select import Device, resolve_dtype, select_device
from common.engine.scheduler import KINDS, POLICIES, PREEMPTIONS
from common.io.checkpoint import args_from_hf, build_empty
from common.io.presets import load_tokenizer, preset_args
from common.io.quantized import FUSED, quantization_config
from common.nn.causal_lm import CausalLM, ModelArgs
from common.parallel.offload import MODES as OFFLOAD_MODES
from common.parallel.support import check_parallel
from common.quant.scheme import configured_scheme
from common.quant.skip import skip_filter
from common.transforms.fusion import fuse_projections
from common.transforms.registry import (
    check_opts_supported,
    check_saved_quantization,
    opt_specs,
)

_ABSENT = object()


@dataclass(frozen=True)
class Checked:
    config: RecipeConfig
    device: Device
    variants: list[Variant]
    args: ModelArgs | None = None  # the model's hyper-parameters, without its weights
    requests: list[Request] | None = None  # the workload's requests, as the workers build them


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
    SamplingParams.from_generation(cfg.generation)
    if spec_config(cfg) and beam_config(cfg):
        raise RecipeError("spec_decode and generation.num_beams > 1 do not combine: choose one")
    _choice("offload", config.offload, OFFLOAD_MODES)
    if config.offload_cold and config.offload != "disk":
        raise RecipeError(
            "offload_cold=true drops the layer file from the page cache: it needs offload=disk"
        )
    if config.quant.weights != "none":
        configured_scheme(config.quant)
    if config.model.path and (saved := quantized_with(config.model.path)) is not None:
        check_saved_quantization(saved, config.quant)  # before any worker, not after a row
    if config.quant.save:
        raise RecipeError(
            "quant.save is written by scripts/quantize.py, with the same overrides: "
            "python scripts/quantize.py +opt=... quant.save=DIR; then run with model.path=DIR"
        )
    ops.pin(pinned_kernels(cfg))  # an unknown implementation names the op's choices


def _check_requests(
    cfg: Any, model: ModelConfig, args: ModelArgs, model_cls: type[CausalLM]
) -> list[Request]:
    """Build the workload's requests as the workers will: a bad prompt file line, a zero
    count or length, an unreadable image fails here (the model on the meta device: only
    its config is read)."""
    text = cfg.workload.kind in ("file", "vl")
    tokenizer = load_tokenizer(model.path) if model.path and text else None
    meta = build_empty(lambda: model_cls(args))
    requests = build_requests(cfg.workload, args.vocab_size, tokenizer, meta, model.path)
    if cfg.bench.peers and any(r.mm_items for r in requests):
        raise RecipeError("bench.peers run text prompts only; this workload has images")
    arrival_times(cfg.workload, len(requests))
    return requests


def _opt_file(name: str) -> Any:
    return OmegaConf.load(CONFIG_DIR / "opt" / f"{name}.yaml")


def _without_opts(cfg: Any, opts: list[str]) -> Any:
    """The command's config with the keys its +opt list set back at their defaults: what a
    row starts from before its own opts (bench.each / ladder rows hold a subset)."""
    defaults = OmegaConf.load(CONFIG_DIR / "recipe_defaults.yaml")
    base = OmegaConf.create(OmegaConf.to_container(cfg))
    for name in opts:
        for key, _ in _leaves(_opt_file(name)):
            if key != "opts" and not key.startswith("opts."):
                OmegaConf.update(base, key, OmegaConf.select(defaults, key), merge=False)
    return base


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if not OmegaConf.is_dict(node):
        return [(prefix, node)]
    return [
        leaf
        for k, v in node.items()
        for leaf in _leaves(v, f"{prefix}{k}" if not prefix else f"{prefix}.{k}")
    ]


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
    dtype = resolve_dtype(config.model.dtype, device)
    _check_choices(cfg, config, device)
    args = _model_args(cfg.model, model_cls)
    for peer in config.bench.peers:
        check_peer(peer, cfg, model_cls, args)
    requests = _check_requests(cfg, config.model, args, model_cls)
    _check_skip(config, model_cls, args)
    opts = list(config.opts)
    rows = config.bench.variants
    if rows and opts:
        raise RecipeError(
            "give the rows either as +opt=... or as bench.variants=[[...], ...], not both"
        )
    specs = {**opt_specs(CONFIG_DIR), **config.opts}
    variants = plan(
        opts, config.bench.ladder, config.bench.each, config.bench.peers, rows, specs,
        str(dtype).removeprefix("torch."),
    )  # fmt: skip
    if not config.bench.each:  # the combined variant must be a valid KV choice
        kv_spec(cfg)
    base = _without_opts(cfg, opts)
    for v in variants:  # each row's config as its worker composes it (opts add keys)
        _check_overrides(cfg, v.overrides)
        vcfg = OmegaConf.merge(
            base, *(_opt_file(o) for o in v.opts), OmegaConf.from_dotlist(v.overrides)
        )
        check_parallel(
            vcfg.parallel, args, kv_spec(vcfg).kind, vcfg.offload, v.peer,
            cfg.workload.kind, config.scheduler.max_batch, vcfg.compile.enabled,
        )  # fmt: skip
        ranks = vcfg.parallel.tp * vcfg.parallel.pp
        if ranks > 1 and (vcfg.spec.enabled or vcfg.generation.num_beams > 1):
            raise RecipeError(
                "spec_decode and beam search run on one device; drop them or parallel.tp/pp"
            )
    compiled = config.compile.enabled or any("compile" in v.opts for v in variants)
    if compiled and config.bench.warmup < 1:
        raise RecipeError(
            "compile needs bench.warmup >= 1: the warm-up pass compiles, so TPOT never "
            "includes compile time"
        )
    return Checked(config, device, variants, args, requests)


def quantized_with(path: str) -> dict | None:
    """A quantized checkpoint's scheme config (what the loaded model will carry), else None."""
    saved = quantization_config(path)
    return None if saved is None else {k: v for k, v in saved.items() if k != FUSED}


def _check_overrides(cfg: Any, overrides: list[str]) -> None:
    """A row's KEY=VALUE settings: existing keys, values of the right type and range."""
    if not overrides:
        return
    for item in overrides:
        key = item.partition("=")[0]
        if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            raise RecipeError(f"bench.variants override {item!r}: unknown config key {key!r}")
    typed(OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides)))
