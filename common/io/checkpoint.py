"""Load Hugging Face format checkpoints into our own nn.Module models, or seed them randomly.

Models are built on the meta device (`build_empty`) and then materialized one tensor at a time,
so peak host memory is the final model plus about one tensor, whatever the checkpoint size.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import partial
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from common.core.errors import RecipeError
from common.nn.causal_lm import CausalLM, ModelArgs
from common.parallel.placement import Part, Placement

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SHARD = "model-{:05d}-of-{:05d}.safetensors"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# The HF Trainer writes these next to the weights; they are not model tensors.
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth")
INIT_STD = 0.02  # HF's initializer_range default for LLaMA-family models

Device = torch.device | str


def read_hf_config(path: str | Path) -> dict:
    """Return config.json of a Hugging Face model directory as a dict."""
    path = _require_dir(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise RecipeError(
            f"{config_file} not found: a model directory needs a Hugging Face config.json"
        )
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"{config_file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise RecipeError(f"{config_file} must hold a JSON object, got {type(config).__name__}")
    return config


def build_empty(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a model whose parameters are on the meta device, so any size allocates nothing.

    Buffers stay real: non-persistent ones (e.g. rotary inv_freq) are never in a checkpoint, so
    their constructor-computed values must survive.
    """
    with init_empty_weights(include_buffers=False):
        return factory()


def load_weights(
    model: nn.Module,
    path: str | Path,
    device: Device,
    dtype: torch.dtype,
    allow_pickle: bool = False,
    placement: Placement | None = None,
) -> nn.Module:
    """Fill `model` (typically from `build_empty`) with the checkpoint in directory `path`.

    Floating tensors are cast to `dtype`; every tensor lands on `device`. The checkpoint must match
    the model exactly (names and shapes), except tied dependents, which may be absent. A
    placement (common/parallel/placement.py) makes this rank read only its slice of each
    sharded tensor and, for a pipeline stage, only the tensors its stage holds.
    """
    path = _require_dir(path)
    placement = placement or Placement()
    files, is_pickle = _find_weight_files(path)
    if is_pickle and not allow_pickle:
        names = ", ".join(f.name for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise RecipeError(
            f"{path} holds only pickle weights ({names}): pickle checkpoint refused; "
            "set model.allow_pickle=true to load it with torch.load(weights_only=True)"
        )
    tied = _tied_weights(model)
    expected = model.state_dict(keep_vars=True)
    with _open_checkpoint(files, is_pickle) as found:
        found = _renamed(found, getattr(model, "checkpoint_renames", ()))
        for name, source in placement.aliases.items():
            if name not in found and source in found:
                found[name] = found[source]
        if placement.subset:  # a pipeline stage: the other stages' tensors stay unread
            found = {n: e for n, e in found.items() if n in expected}
        # Check everything from headers first: a mismatch should fail before minutes of reading.
        _check_names(path, expected, found, optional=set(tied))
        _check_shapes(expected, found, placement.parts)
        for name, entry in found.items():
            if name in tied:  # replaced by the source parameter below, as HF does
                continue
            part = placement.parts.get(name)
            try:
                value = part.take(entry.read_part, entry.shape) if part else entry.read()
            except (SafetensorError, OSError, RuntimeError) as e:
                raise RecipeError(
                    f"{entry.file}: cannot read tensor {name}: {_first_line(e)}"
                ) from e
            _check_finite(name, entry.file, value, dtype)
            _set_tensor(model, name, value, device, dtype)
    _tie(model, tied)
    return model.to(device).eval()  # moves the non-persistent buffers too


def _draws(model: nn.Module, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter's seeded float32 value in a fixed order (tied dependents excluded).

    nn.Linear / nn.Embedding weights ~ N(0, 0.02) and biases zero; any other module owning
    parameters must have `reset_parameters()`, run on float32 parameters of its own."""
    tied = _tied_weights(model)
    generator = torch.Generator().manual_seed(seed)
    # reset_parameters() may draw from the global CPU RNG; seed it without leaking state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module_name, module in model.named_modules():
            own = dict(module.named_parameters(recurse=False))
            if not own:
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                for leaf, param in own.items():
                    if _join(module_name, leaf) in tied:
                        continue
                    value = torch.empty(param.shape, dtype=torch.float32)
                    if leaf == "bias":
                        value.zero_()
                    else:
                        value.normal_(0.0, INIT_STD, generator=generator)
                        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                            value[module.padding_idx].zero_()
                    yield _join(module_name, leaf), value
            elif callable(getattr(module, "reset_parameters", None)):
                for leaf, param in own.items():
                    module._parameters[leaf] = nn.Parameter(
                        torch.empty(param.shape, dtype=torch.float32), param.requires_grad
                    )
                with torch.no_grad():
                    module.reset_parameters()
                for leaf, param in list(module.named_parameters(recurse=False)):
                    yield _join(module_name, leaf), param.detach()
            else:
                names = ", ".join(_join(module_name, leaf) for leaf in own)
                raise RecipeError(
                    f"init_random: no rule to initialize {names}: {type(module).__name__} is not "
                    "nn.Linear/nn.Embedding and has no reset_parameters()"
                )


def init_random(
    model: nn.Module,
    device: Device,
    dtype: torch.dtype,
    seed: int,
    placement: Placement | None = None,
    full: nn.Module | None = None,
) -> nn.Module:
    """Materialize `model` with seeded random weights, identical for a seed on every device.

    Values are drawn on CPU in float32, then cast and moved, so neither the device nor the
    dtype changes the draw. Buffers keep their values. With a placement, the draws run over
    `full` (the whole model, on meta) so every rank draws what one device would, and each
    rank keeps its slice of each tensor (one full tensor at a time).
    """
    placement = placement or Placement()
    tied = _tied_weights(model)
    readers: dict[str, list[str]] = {}  # drawn name -> the parameters that take it
    for name, _ in model.named_parameters():
        if name not in tied:
            readers.setdefault(placement.aliases.get(name, name), []).append(name)
    for name, value in _draws(full if full is not None else model, seed):
        for target in readers.get(name, []):
            part = placement.parts.get(target)
            local = part.take(value.__getitem__, tuple(value.shape)) if part else value
            module_name, _, leaf = target.rpartition(".")
            module = model.get_submodule(module_name)
            _replace_param(module, leaf, local.to(device=device, dtype=dtype))
    _tie(model, tied)
    return model.to(device).eval()


def save_weights(model: nn.Module, path: str | Path, max_shard_bytes: int | None = None) -> None:
    """Write the model as HF-format safetensors, sharded with an index when `max_shard_bytes` is set.

    Tied dependents are skipped (HF omits them too); tensors are copied to CPU one shard at a time.
    """
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise RecipeError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    path = Path(path).expanduser()
    tied = _tied_weights(model)
    tensors = {name: t for name, t in model.state_dict().items() if name not in tied}
    meta = [name for name, t in tensors.items() if t.is_meta]
    if meta:
        raise RecipeError(
            f"cannot save {_fmt_names(meta)}: still on the meta device (load or init_random first)"
        )
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes

    path.mkdir(parents=True, exist_ok=True)
    # Stale files from an earlier save would shadow the new ones (the loader prefers model.safetensors).
    for stale in [path / SAFE_SINGLE, path / SAFE_INDEX, *path.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if max_shard_bytes is None:
        _write_safetensors(path / SAFE_SINGLE, {n: tensors[n] for n in shards[0]})
        return
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, start=1):
        file_name = SAFE_SHARD.format(i, len(shards))
        _write_safetensors(path / file_name, {n: tensors[n] for n in names})
        weight_map.update(dict.fromkeys(names, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


@dataclass(frozen=True)
class _Entry:
    """One checkpoint tensor: where it lives, its shape, and how to read it (lazily)."""

    file: Path
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]
    read_part: Callable[[tuple[slice, ...]], torch.Tensor]  # only that slice is read


def _require_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise RecipeError(f"model directory {path} {what}")
    return path


def _find_weight_files(path: Path) -> tuple[list[Path], bool]:
    """Return the weight files and whether they are pickles; safetensors win, as in HF."""
    if (path / SAFE_SINGLE).is_file():
        return [path / SAFE_SINGLE], False
    if (path / SAFE_INDEX).is_file():
        return _index_files(path / SAFE_INDEX), False
    safe = sorted(path.glob("*.safetensors"))
    if safe:
        return safe, False
    if (path / PICKLE_SINGLE).is_file():
        return [path / PICKLE_SINGLE], True
    if (path / PICKLE_INDEX).is_file():
        return _index_files(path / PICKLE_INDEX), True
    pickles = sorted(
        f
        for f in path.iterdir()
        if f.is_file()
        and f.suffix in PICKLE_SUFFIXES
        and not any(fnmatch(f.name, pattern) for pattern in NOT_WEIGHTS)
    )
    if pickles:
        return pickles, True
    raise RecipeError(
        f"no weights found in {path}: looked for {SAFE_SINGLE}, {SAFE_INDEX}, *.safetensors, "
        f"{PICKLE_SINGLE}, {PICKLE_INDEX}, *.bin, *.pt, *.pth"
    )


def _index_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise RecipeError(f"{index} is not a valid checkpoint index: {e}") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise RecipeError(f"{index} has no valid weight_map (tensor name -> shard file)")
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise RecipeError(f"{index} lists shard files that do not exist: {_fmt_names(absent)}")
    return files


@contextmanager
def _open_checkpoint(files: list[Path], is_pickle: bool) -> Iterator[dict[str, _Entry]]:
    """Map every tensor name to its entry, reading only headers (pickles are memory-mapped)."""
    entries: dict[str, _Entry] = {}
    with ExitStack() as stack:
        for file in files:
            if is_pickle:
                state = _torch_load(file)
                # Clone so the loaded model does not stay backed by the mapped file.
                found = {
                    n: (tuple(t.shape), t.clone, lambda i, t=t: t[i].clone())
                    for n, t in state.items()
                }
            else:
                try:
                    handle = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
                    names = handle.keys()  # the handle is not iterable itself
                    found = {
                        n: (
                            tuple(handle.get_slice(n).get_shape()),
                            partial(handle.get_tensor, n),
                            lambda i, n=n, h=handle: h.get_slice(n)[i],
                        )
                        for n in names
                    }
                except (SafetensorError, OSError) as e:
                    raise RecipeError(
                        f"{file}: corrupt or unreadable safetensors file ({_first_line(e)})"
                    ) from e
            for name, (shape, read, read_part) in found.items():
                if name in entries:
                    raise RecipeError(f"tensor {name} is in both {entries[name].file} and {file}")
                entries[name] = _Entry(file, shape, read, read_part)
        yield entries


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # pre-zipfile (torch < 1.6) pickles cannot be memory-mapped
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling untrusted bytes can fail in many ways; all mean "bad file"
        raise RecipeError(
            f"{file}: torch.load(weights_only=True) failed ({type(e).__name__}: {_pickle_reason(e)})"
        ) from e
    if not isinstance(state, dict):
        raise RecipeError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
    bad = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise RecipeError(
            f"{file}: entry {bad[0]!r} is not a named tensor ({type(state[bad[0]]).__name__})"
        )
    return state


def _renamed(found: dict[str, _Entry], renames: tuple[tuple[str, str], ...]) -> dict[str, _Entry]:
    """Checkpoint names in the model's layout: each (regex, replacement) of the model's
    `checkpoint_renames` applied in turn (an earlier layout of the same architecture, renamed
    as transformers renames it when loading)."""
    if not renames:
        return found
    out = {}
    for name, entry in found.items():
        for pattern, replacement in renames:
            name = re.sub(pattern, replacement, name)
        out[name] = entry
    return out


def _check_names(
    path: Path, expected: dict[str, torch.Tensor], found: dict[str, _Entry], optional: set[str]
) -> None:
    missing = [n for n in expected if n not in found and n not in optional]
    unexpected = [n for n in found if n not in expected]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_fmt_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_fmt_names(unexpected)}")
    if problems:
        raise RecipeError(f"checkpoint {path} does not match the model: " + "; ".join(problems))


def _check_shapes(
    expected: dict[str, torch.Tensor], found: dict[str, _Entry], parts: dict[str, Part]
) -> None:
    """A sharded tensor's slice must have the rank-local shape of the model's parameter."""

    def local(n: str) -> tuple[int, ...]:
        return parts[n].shape(found[n].shape) if n in parts else found[n].shape

    bad = [n for n in found if local(n) != tuple(expected[n].shape)]
    if bad:
        name = bad[0]
        more = f" (and {len(bad) - 1} more mismatched tensor(s))" if len(bad) > 1 else ""
        shard = f" (this rank: {local(name)})" if name in parts else ""
        raise RecipeError(
            f"{name}: checkpoint shape {found[name].shape}{shard} != model shape "
            f"{tuple(expected[name].shape)} in {found[name].file}{more}"
        )


def _check_finite(name: str, file: Path, value: torch.Tensor, dtype: torch.dtype) -> None:
    """NaN or inf weights run and emit garbage that looks like output: refuse them at load, as
    well as finite values the cast to `dtype` would turn into inf (fp32 > 65504 into float16).
    aminmax propagates NaN and reads the tensor once without a full-size temporary."""
    if not value.is_floating_point() or value.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(value))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(value)).sum())
        raise RecipeError(
            f"{file}: tensor {name} holds {bad} non-finite value(s) (NaN or inf) among "
            f"{value.numel()}: the checkpoint is corrupt"
        )
    limit = torch.finfo(dtype).max
    if max(-lo, hi) > limit:
        raise RecipeError(
            f"{file}: tensor {name} has values up to {max(-lo, hi):.4g}, beyond "
            f"{str(dtype).removeprefix('torch.')}'s {limit:.4g}; use model.dtype=bfloat16 or float32"
        )


def _set_tensor(
    model: nn.Module, name: str, value: torch.Tensor, device: Device, dtype: torch.dtype
) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    if leaf in module._parameters:
        _replace_param(module, leaf, value)
    else:
        module._buffers[leaf] = value


def _replace_param(module: nn.Module, leaf: str, value: torch.Tensor) -> None:
    """Swap in a new Parameter (a meta Parameter cannot be filled in place)."""
    requires_grad = module._parameters[leaf].requires_grad and value.is_floating_point()
    module._parameters[leaf] = nn.Parameter(value, requires_grad=requires_grad)


def _tied_weights(model: nn.Module) -> dict[str, str]:
    return dict(getattr(model, "tied_weights", None) or {})


def _tie(model: nn.Module, tied: dict[str, str]) -> None:
    """Make each dependent the very same Parameter object as its source."""
    for dependent, source in tied.items():
        try:
            target = model.get_parameter(dependent)
            shared = model.get_parameter(source)
        except AttributeError as e:
            raise RecipeError(f"tied_weights {dependent} -> {source}: {e}") from e
        if target.shape != shared.shape:
            raise RecipeError(
                f"tied_weights {dependent} {tuple(target.shape)} cannot share "
                f"{source} {tuple(shared.shape)}"
            )
        module_name, _, leaf = dependent.rpartition(".")
        model.get_submodule(module_name)._parameters[leaf] = shared


def _write_safetensors(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    cpu = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
    try:
        save_file(cpu, file, metadata={"format": "pt"})  # transformers requires format=pt
    except (SafetensorError, RuntimeError, ValueError, OSError) as e:
        raise RecipeError(f"cannot write {file}: {_first_line(e)}") from e


def _join(module_name: str, leaf: str) -> str:
    return f"{module_name}.{leaf}" if module_name else leaf


def _fmt_names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _pickle_reason(e: BaseException) -> str:
    """torch's weights_only error is a paragraph; the line naming the blocked global is the point."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line), _first_line(e))


# Each transformers architecture: the recipe (recipes/<name>/run.py) that runs it, its model_type.
RECIPES = {
    "LlamaForCausalLM": ("llama65b", "llama"),
    "GlmForCausalLM": ("chatglm", "glm"),
    "Qwen2VLForConditionalGeneration": ("qwen_vl", "qwen2_vl"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen_vl", "qwen2_5_vl"),
}
# Layouts of a supported family that no recipe loads, and what to use instead.
OTHER_LAYOUTS = {
    "chatglm": "THUDM's remote-code ChatGLM layout; use the transformers layout "
    "(model_type 'glm', e.g. THUDM/glm-4-9b-chat-hf) with recipes/chatglm/run.py",
}


def check_architecture(cls: type[CausalLM], config: dict, path: str | Path) -> None:
    """Refuse a checkpoint of another architecture by name, before its keys are read: a GPT-2
    config would otherwise fail as "lacks hidden_size". config.json names the architecture in
    `architectures` (written by save_pretrained) or, failing that, `model_type`."""
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    model_type = config.get("model_type")
    own_type = RECIPES.get(cls.hf_class_name, (None, None))[1]
    if archs:
        if cls.hf_class_name.casefold() in (a.casefold() for a in archs):
            return
        by_class = {c.casefold(): name for c, (name, _) in RECIPES.items()}
        fits = next((by_class[a.casefold()] for a in archs if a.casefold() in by_class), None)
    elif isinstance(model_type, str):
        if own_type is None or model_type == own_type:
            return
        fits = next((name for name, t in RECIPES.values() if t == model_type), None)
    else:
        return  # the config names no architecture: its keys are all there is to check
    if fits:
        hint = f"run it with recipes/{fits}/run.py"
    elif model_type in OTHER_LAYOUTS:
        hint = OTHER_LAYOUTS[model_type]
    else:
        hint = "no recipe here runs it; recipes: " + ", ".join(
            f"{name} ({c})" for c, (name, _) in RECIPES.items()
        )
    found = f"architectures {', '.join(archs)}, " if archs else ""
    raise RecipeError(
        f"{path}: config.json names {found}model_type {model_type!r}; this recipe runs "
        f"{cls.hf_class_name}: {hint}"
    )


def args_from_hf(cls: type[CausalLM], path: str | Path) -> ModelArgs:
    """The model's hyper-parameters from a checkpoint's config.json."""
    config = read_hf_config(path)
    check_architecture(cls, config, path)
    return cls.args_cls.from_hf_config(config)


def from_pretrained(
    cls: type[CausalLM],
    path: str | Path,
    device: Device = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    place: Callable[[CausalLM], Placement] | None = None,
) -> CausalLM:
    """Build on the meta device, then load an HF checkpoint with strict name/shape checks.
    place(model): shapes the meta model to this rank's share and says what it reads."""
    args = args_from_hf(cls, path)
    model = build_empty(lambda: cls(args))
    placement = place(model) if place else None
    return load_weights(model, path, device, dtype, allow_pickle, placement)


def from_seed(
    cls: type[CausalLM],
    args: ModelArgs,
    seed: int,
    device: Device = "cpu",
    dtype=torch.float32,
    place: Callable[[CausalLM], Placement] | None = None,
) -> CausalLM:
    """The same architecture with seeded random weights (no checkpoint); with `place`, this
    rank's share of the very weights one device would draw."""
    model = build_empty(lambda: cls(args))
    if place is None:
        return init_random(model, device, dtype, seed).eval()
    placement = place(model)
    return init_random(model, device, dtype, seed, placement, build_empty(lambda: cls(args)))
