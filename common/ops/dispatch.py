"""One dispatch table: each op has several implementations, and the one that runs is chosen
per (op, device, dtype, rows bucket, size class) by a short measurement on first use on this
machine.

A threshold measured on one CPU is not a constant here: the C++ int8 matrix-vector kernel is
1.8x faster than torch._weight_int8pack_mm on an AMD EPYC and 1.5x slower on an Intel Xeon
with AMX. So the first call of a bucket times every eligible implementation on the call's
own arguments (median of a few samples, a few ms in all) and ranks them; the ranking is
cached in a JSON file next to the built kernels, keyed by the CPU, torch version and thread
count. The size class (bytes of the operand the kernel streams, in steps of 16x) keeps the
first shape seen, say a tiny test model's, from deciding for a model 1000x larger.

Eligibility stays a rule (device, dtype, alignment, K % 16, "g++ built it"): a ranked
implementation runs only where its rule holds, else the next one in the ranking does.
Pin a choice with LLM_RECIPES_KERNELS="int8_linear=int8pack_mm,rms_norm=torch" or pin();
a pin applies wherever its rule holds. chosen() says what ran, for the results.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from common.core.errors import RecipeError
from common.ops.build import cache_dir, machine
from common.ops.library import loads

ENV = "LLM_RECIPES_KERNELS"
BUCKETS = (1, 2, 4, 8, 16, 64, 256)  # rows up to each bound share a choice; > 256: one more
_LABELS = ("1", "2", "3-4", "5-8", "9-16", "17-64", "65-256", "257+")
_BUCKET_OF = [bisect.bisect_left(BUCKETS, rows) for rows in range(BUCKETS[-1] + 2)]  # traceable
_SIZES = ("16", "256", "4K", "64K", "1M", "16M")  # size class c: bytes <= 16**c; then > 16M
_SAMPLES, _SAMPLE_S, _BUDGET_S = 7, 5e-4, 0.02  # per implementation: timed samples, the least
# time one sample takes (several calls of a microsecond op), and the time that stops them early


@dataclass(frozen=True, eq=False)
class Impl:
    """One implementation of an op. devices/dtypes: where it may run (None: anywhere);
    cpp: the C++ source it needs built (common/ops/NAME.cpp; skipped where g++ fails);
    when(*args): a rule on the call's arguments (shape, alignment), checked per call."""

    name: str
    fn: Callable[..., Tensor]
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    cpp: str | None = None
    when: Callable[..., bool] | None = None

    def allows(self, args: tuple) -> bool:
        return self.when is None or self.when(*args)

    def runs_on(self, device: str, dtype: torch.dtype) -> bool:
        return (self.devices is None or device in self.devices) and (
            self.dtypes is None or dtype in self.dtypes
        )

    def available(self, device: str, dtype: torch.dtype) -> bool:
        return self.runs_on(device, dtype) and (self.cpp is None or loads(self.cpp))


Key = tuple[str, str, torch.dtype, int, int]  # op, device type, dtype, rows bucket, size class


def _size_class(nbytes: int) -> int:
    return min(max(((max(nbytes, 1) - 1).bit_length() + 3 >> 2) - 1, 0), len(_SIZES))


class Op:
    """An op with several implementations, listed in the order used when nothing is measured
    (under torch.compile, before a measurement exists). Calling it runs the chosen one.
    rows(*args): rows (tokens or queries) of the call; size(*args): bytes of the operand the
    kernel streams (a weight, a row, a cache). bench_args(args): argument tuples the
    measurement cycles through (default: the call's own arguments)."""

    def __init__(
        self,
        name: str,
        impls: Sequence[Impl],
        rows: Callable[..., int],
        size: Callable[..., int],
        bench_args: Callable[[tuple], list[tuple]] | None = None,
    ) -> None:
        self.name, self.rows, self.size = name, rows, size
        self.impls = {impl.name: impl for impl in impls}
        self.bench_args = bench_args or (lambda args: [args])
        self._ranked: dict[Key, tuple[list[Impl], list[Impl]]] = {}  # key -> (ranked, unranked)
        self.pinned: Impl | None = None
        self._seen: set[tuple[Key, Impl]] = set()  # what _USED already records
        OPS[name] = self
        _check_pin(name)

    def __call__(self, *args) -> Tensor:
        return self.choose(*args).fn(*args)

    def choose(self, *args) -> Impl:
        x = args[0]  # kept lean: a decode step makes ~120 calls
        device = "cpu" if x.is_cpu else x.device.type
        rows = _BUCKET_OF[min(self.rows(*args), BUCKETS[-1] + 1)]
        key = (self.name, device, x.dtype, rows, _size_class(self.size(*args)))
        if torch.compiler.is_compiling():  # the pin, the ranking so far, declaration order
            return next(i for i in map(self.impls.get, _order(key)) if i.allows(args))
        pinned = self.pinned
        if pinned is not None and pinned.available(device, key[2]) and pinned.allows(args):
            return self._used(key, pinned, True)
        ranked, unranked = self._ranked.get(key) or self._load(key)
        if unranked and any(impl.allows(args) for impl in unranked):
            ranked, unranked = self._measure(key, args, ranked, unranked)
        for impl in ranked:
            if impl.when is None or impl.when(*args):
                return self._used(key, impl, False)
        raise RecipeError(f"no implementation of {self.name} runs on {_label(key)}")

    def _used(self, key: Key, impl: Impl, pinned: bool) -> Impl:
        if (key, impl) not in self._seen:
            self._seen.add((key, impl))
            _USED.setdefault(key, {})[impl.name] = pinned
        return impl

    def _load(self, key: Key) -> tuple[list[Impl], list[Impl]]:
        candidates = [i for i in self.impls.values() if i.available(key[1], key[2])]
        names = _cache().get(_label(key), [])
        ranked = [self.impls[n] for n in names if n in self.impls and self.impls[n] in candidates]
        self._ranked[key] = ranked, [i for i in candidates if i not in ranked]
        return self._ranked[key]

    def _measure(
        self, key: Key, args: tuple, ranked: list[Impl], unranked: list[Impl]
    ) -> tuple[list[Impl], list[Impl]]:
        """Time every implementation eligible for these args; ranked ones that are not (an
        earlier call's rules) keep their place after them."""
        eligible = [i for i in (*ranked, *unranked) if i.allows(args)]
        times = dict.fromkeys((i.name for i in eligible), 0.0)
        if len(eligible) > 1:  # one choice needs no timing
            sets = self.bench_args(args)
            times = {impl.name: _time(impl.fn, sets, args[0].device) for impl in eligible}
        new = sorted(eligible, key=lambda i: times[i.name])
        new += [i for i in ranked if i not in new]
        self._ranked[key] = new, [i for i in unranked if i not in new]
        _store(_label(key), {i.name: round(times.get(i.name, -1) * 1e6, 1) for i in new})
        return self._ranked[key]


def choose_variant(
    name: str,
    variants: Mapping[str, Callable[[], Callable[[], object]]],
    device: str,
    dtype: torch.dtype,
    rows: int,
    nbytes: int,
) -> str:
    """A choice that is no single op call, such as how inductor lowers a compiled graph's
    matmuls: ranked per machine like an op's implementations (one timing, cached under the
    same kind of label), pinned the same way (LLM_RECIPES_KERNELS="NAME=VARIANT") and listed
    by chosen(). variants: name -> a factory of the zero-argument workload to time, called
    only when measuring (building one may compile)."""
    key = (name, device, dtype, _BUCKET_OF[min(rows, BUCKETS[-1] + 1)], _size_class(nbytes))
    pinned = _PINS.get(name)
    if pinned is not None and pinned not in variants:
        raise _unknown_kernel(name, pinned, variants)
    choice = pinned
    if choice is None:
        ranked = [n for n in _cache().get(_label(key), {}) if n in variants]
        if len(ranked) < len(variants):
            times = {n: _time(make(), [()], torch.device(device)) for n, make in variants.items()}
            ranked = sorted(times, key=times.__getitem__)
            _store(_label(key), {n: round(times[n] * 1e6, 1) for n in ranked})
        choice = ranked[0]
    _USED.setdefault(key, {})[choice] = pinned is not None
    return choice


OPS: dict[str, Op] = {}
_PINS: dict[str, str] = {}
_USED: dict[Key, dict[str, bool]] = {}  # key -> implementations that ran (name -> pinned)
_state: dict[str, object] = {}  # "path": the cache file, "data": its contents


def _order(key: Key) -> tuple[str, ...]:
    """Under torch.compile (fake tensors, nothing to time), run at trace time: the names of
    the pinned implementation, the ranked ones, then the unmeasured ones in declaration order."""
    op = OPS[key[0]]
    ranked, unranked = op._ranked.get(key) or op._load(key)
    pinned = [op.pinned] if op.pinned is not None and op.pinned.available(key[1], key[2]) else []
    return tuple(dict.fromkeys(i.name for i in (*pinned, *ranked, *unranked)))


# torch.compiler.assume_constant_result(_order), minus its import of torch._dynamo, which
# costs every process ~1.5 s of start-up (tests/test_ops_compile.py checks it still works).
_order._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _label(key: Key) -> str:
    op, device, dtype, rows, size = key
    size_label = f"<={_SIZES[size]}" if size < len(_SIZES) else f">{_SIZES[-1]}"
    return (
        f"{op}[{device},{str(dtype).removeprefix('torch.')},rows={_LABELS[rows]},bytes{size_label}]"
    )


def _time(fn: Callable[..., Tensor], sets: list[tuple], device: torch.device) -> float:
    """Seconds per call: the fastest of a few samples of enough calls to last _SAMPLE_S, each
    call on the next argument set (so weights come from memory, not cache, when the sets
    together exceed it); stops early past the time budget. The minimum, not the median:
    on a shared machine noise only ever adds time."""

    def sync() -> None:
        if device.type != "cpu":
            torch.accelerator.synchronize()  # unverified: no GPU/NPU in CI

    for args in sets:  # warm-up: first-touch faults and per-weight setup (a packing) per set
        fn(*args)
    sync()
    t0 = time.perf_counter()
    fn(*sets[0])  # its time sizes the samples
    sync()
    calls = max(1, min(100, int(_SAMPLE_S / max(time.perf_counter() - t0, 1e-7))))
    times: list[float] = []
    i = 0
    while len(times) < _SAMPLES and (not times or sum(times) * calls < _BUDGET_S):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            i += 1
            fn(*sets[i % len(sets)])
        sync()
        times.append((time.perf_counter() - t0) / calls)
    return min(times)


def cache_file() -> Path:
    """The JSON file of measured rankings for this CPU, torch version and thread count."""
    if "path" not in _state:
        ident = f"{machine()}|{torch.__version__}|{torch.get_num_threads()}"
        digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
        _state["path"] = cache_dir() / f"kernel_choices_{digest}.json"
    return _state["path"]  # type: ignore[return-value]


def _cache() -> dict[str, dict[str, float]]:
    """label -> {implementation: measured us per call (-1: not timed for this bucket's
    latest measurement)}, fastest first."""
    if "data" not in _state:
        try:
            _state["data"] = json.loads(cache_file().read_text())
        except (OSError, ValueError):
            _state["data"] = {}
    return _state["data"]  # type: ignore[return-value]


def _store(label: str, ranking: dict[str, float]) -> None:
    """Merge one ranking into the file (another process may have added others) atomically."""
    path = cache_file()
    _state.pop("data", None)
    data = _cache()
    data[label] = ranking
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(data, f, indent=1)  # key order is the ranking: not sorted
        os.replace(f.name, path)
    except OSError:  # a read-only cache only costs a measurement per process
        pass


def _unknown_kernel(op: str, name: str, choices: Iterable[str]) -> RecipeError:
    return RecipeError(f"unknown kernel {name!r} for {op}; choose one of {', '.join(choices)}")


def _check_pin(op: str) -> None:
    """Attach the pin to its op once both exist; an unknown implementation is an error."""
    name = _PINS.get(op)
    if op not in OPS:
        return
    if name is not None and name not in OPS[op].impls:
        del _PINS[op]
        raise _unknown_kernel(op, name, OPS[op].impls)
    OPS[op].pinned = None if name is None else OPS[op].impls[name]


def pin(choices: Mapping[str, str] | str) -> None:
    """Run these implementations wherever their rules allow: {"int8_linear": "int8pack_mm"}
    or "int8_linear=int8pack_mm,rms_norm=torch" (the LLM_RECIPES_KERNELS form). An op not yet
    imported is checked when it registers."""
    if isinstance(choices, str):
        pairs = [item.partition("=") for item in choices.split(",") if item.strip()]
        if any(not sep or not op.strip() or not name.strip() for op, sep, name in pairs):
            raise RecipeError(f"kernel pins {choices!r}: write op=implementation[,op=...]")
        choices = {op.strip(): name.strip() for op, _, name in pairs}
    for op, name in choices.items():
        _PINS[op] = name
        _check_pin(op)


def chosen() -> dict[str, str]:
    """What ran in this process: {"int8_linear[cpu,bfloat16,rows=1,bytes<=16M]": "cpp_matvec"};
    several names when the rules sent calls of one bucket to different implementations,
    "(pinned)" when a pin chose it."""
    return {
        _label(key): ", ".join(n + (" (pinned)" if p else "") for n, p in used.items())
        for key, used in sorted(_USED.items(), key=lambda kv: _label(kv[0]))
    }


def reset(cache: Path | None = None) -> None:
    """Forget measurements, pins and what ran, re-read LLM_RECIPES_KERNELS, and read/write
    rankings in `cache` (default: the file next to the built kernels). For tests."""
    _state.clear()
    if cache is not None:
        _state["path"] = cache
    _PINS.clear()
    _USED.clear()
    for op in OPS.values():
        op._ranked.clear()
        op._seen.clear()
        op.pinned = None
    pin(os.environ.get(ENV, ""))


pin(os.environ.get(ENV, ""))
