"""The typed recipe config: one dataclass per config section, checked once before any worker.

Hydra composes configs/<recipe>.yaml and the command line as usual; `typed(cfg)` then merges
the result onto these dataclasses (an unknown key or a value of the wrong type is an error
naming its full key) and builds them; then each section's `check()` tests its own value
ranges. Choices that belong to a package above core (attention backends, KV kinds, peers)
are checked by the bench's preflight against that package's own list.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from common.core.errors import RecipeError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# OmegaConf reads the annotations at runtime: Optional[...] instead of `X | None` here.


def models_for(architecture: str) -> list[str]:
    """The model group options (configs/model/*.yaml) of one architecture: a recipe's models."""
    return [
        p.stem
        for p in sorted((CONFIG_DIR / "model").glob("*.yaml"))
        if OmegaConf.load(p).architecture == architecture
    ]


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise RecipeError(f"{key} must be {rule}, got {value!r}")


def _positive_or_none(key: str, value: int | float | None, unset: str) -> None:
    _require(value is None or value > 0, key, value, f"> 0 (null = {unset})")


@dataclass
class OptSpec:
    """configs/opt/NAME.yaml's `opts.NAME` entry: where the opt runs and how it combines."""

    devices: list[str] = field(default_factory=list)
    requires: list[str] = field(default_factory=list)  # opts that must be selected with it
    conflicts: list[str] = field(default_factory=list)  # opts it cannot be combined with


@dataclass
class AttentionConfig:
    backend: str = "eager"


@dataclass
class KVCacheConfig:
    kind: str = "dynamic"
    int8: bool = False
    block_size: int = 16
    prefix_cache: bool = False
    max_len: int | None = None

    def check(self) -> None:
        _require(self.block_size > 0, "kv_cache.block_size", self.block_size, "> 0")
        _positive_or_none("kv_cache.max_len", self.max_len, "the batch's longest sequence")


@dataclass
class SchedulerConfig:
    kind: str = "static"
    policy: str = "fcfs"
    max_batch: int = MISSING
    max_tokens_per_step: int | None = None
    kv_budget: int | None = None
    preemption: str = "recompute"

    def check(self) -> None:
        _require(self.max_batch > 0, "scheduler.max_batch", self.max_batch, "> 0")
        _positive_or_none("scheduler.max_tokens_per_step", self.max_tokens_per_step, "unlimited")
        _positive_or_none("scheduler.kv_budget", self.kv_budget, "room for max_batch sequences")


@dataclass
class CalibConfig:
    """Calibration text for gptq/awq (common/quant/data.py): a file, a hub dataset, or the
    built-in default; num_samples blocks of seq_len tokens."""

    path: str | None = None
    dataset: str | None = None
    split: str = "train"
    num_samples: int = 32
    seq_len: int = 256

    def check(self) -> None:
        _require(self.num_samples > 0, "quant.calib.num_samples", self.num_samples, "> 0")
        _require(self.seq_len > 1, "quant.calib.seq_len", self.seq_len, "> 1")


@dataclass
class QuantConfig:
    weights: str = "none"
    group_size: int | None = None  # null: int4 family 128, int8 one scale per output channel
    bits: int = 4
    act_order: bool = False
    damp: float = 0.01
    awq_grid: int = 20
    clip: bool = True  # gptq/awq int4: search each group's clipping range
    skip: list[str] = field(default_factory=list)
    calib: CalibConfig = field(default_factory=CalibConfig)
    alpha: float = 0.5  # w8a8: SmoothQuant's migration strength
    smooth: bool = True  # w8a8: smooth before quantizing (false: the no-smoothing row)
    save: str | None = None  # write the quantized checkpoint (safetensors + config.json) here

    def check(self) -> None:
        _require(self.group_size in (None, 32, 64, 128), "quant.group_size", self.group_size,
                 "one of 32, 64, 128")  # fmt: skip
        _require(self.bits in (4, 8), "quant.bits", self.bits, "4 or 8")
        _require(0 < self.damp < 1, "quant.damp", self.damp, "in (0, 1)")
        _require(self.awq_grid >= 1, "quant.awq_grid", self.awq_grid, ">= 1")
        _require(0.0 <= self.alpha <= 1.0, "quant.alpha", self.alpha, "in [0, 1]")


@dataclass
class EvalConfig:
    """Held-out text for perplexity (common/quant/data.py): a file, a hub dataset, or the
    built-in default's evaluation split. perplexity: null = only with real weights."""

    path: str | None = None
    dataset: str | None = None
    split: str = "test"
    num_samples: int = 16
    seq_len: int = 512
    perplexity: bool | None = None

    def check(self) -> None:
        _require(self.num_samples > 0, "eval.num_samples", self.num_samples, "> 0")
        _require(self.seq_len > 1, "eval.seq_len", self.seq_len, "> 1")


@dataclass
class FusionConfig:
    projections: bool = False
    add_norm: bool = False
    rotary: bool = False


@dataclass
class CompileConfig:
    """torch.compile of the decode step (common/transforms/compile.py)."""

    enabled: bool = False
    backend: str = "inductor"  # a torch.compile backend (aot_eager: trace only); npu: torchair
    mode: str | None = None  # null: reduce-overhead (CUDA graphs) on cuda, default elsewhere
    cpp_wrapper: bool = True  # inductor on cpu: C++ wrapper code instead of Python
    freezing: bool = False  # inductor: weights as constants (folded, prepacked)


@dataclass
class EncoderConfig:
    """Multimodal models' encoder: feature cache budget and background encoding."""

    cache_mb: float | None = None
    overlap: bool = False

    def check(self) -> None:
        _positive_or_none("encoder.cache_mb", self.cache_mb, "no feature cache")


@dataclass
class ParallelConfig:
    """Ranks of one run (common/parallel/): tensor-parallel ranks x pipeline stages, and how
    torchrun starts them over one node or several."""

    tp: int = 1
    pp: int = 1
    micro_batches: int = 1  # pipeline: a static batch splits into this many in flight
    nnodes: int = 1
    node_rank: int = 0  # this node; node 0 hosts the rendezvous and rank 0 (the results)
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # null: a free port (one node only)
    timeout_s: float = 300.0  # a collective waiting longer fails the run instead of hanging
    cpu_bind: bool = True  # CPU ranks: each on its own share of the cores (launch.bind_cpu_rank)
    shm_mb: float = 16.0  # CPU ranks of one node: TP messages up to this size via shared memory

    def check(self) -> None:
        for key in ("tp", "pp", "micro_batches", "nnodes"):
            _require(getattr(self, key) >= 1, f"parallel.{key}", getattr(self, key), ">= 1")
        _require(self.timeout_s > 0, "parallel.timeout_s", self.timeout_s, "> 0")
        _require(self.shm_mb >= 0, "parallel.shm_mb", self.shm_mb, ">= 0")
        _require(
            0 <= self.node_rank < self.nnodes, "parallel.node_rank", self.node_rank,
            f"in [0, {self.nnodes})",
        )  # fmt: skip
        world = self.tp * self.pp
        if world % self.nnodes:
            raise RecipeError(
                f"parallel.tp x parallel.pp = {world} ranks do not split evenly over "
                f"parallel.nnodes={self.nnodes} nodes"
            )
        if self.nnodes > 1 and self.master_port is None:
            raise RecipeError(
                "a run over several nodes needs parallel.master_addr=HOST and "
                "parallel.master_port=PORT of node 0, the same on every node"
            )


@dataclass
class GenerationConfig:
    """transformers' names; SamplingParams checks the values."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: Any = False  # True | False | "never"

    def check(self) -> None:
        _require(self.num_beams >= 1, "generation.num_beams", self.num_beams, ">= 1")
        _require(
            self.early_stopping in (True, False, "never"),
            "generation.early_stopping",
            self.early_stopping,
            "true, false or never",
        )


@dataclass
class NgramConfig:
    max: int = 4
    min: int = 1


@dataclass
class DraftConfig:
    path: str | None = None
    scale: str = "tiny"
    seed: int = 1


@dataclass
class SpecDecodeConfig:
    enabled: bool = False
    method: str = "ngram"
    k: int = 4
    ngram: NgramConfig = field(default_factory=NgramConfig)
    max_batch: int | None = None
    draft: DraftConfig = field(default_factory=DraftConfig)


@dataclass
class SweepConfig:
    key: str = MISSING
    values: list[Any] = MISSING


@dataclass
class BenchConfig:
    rounds: int = 3
    warmup: int = 1
    repeats: int = 1
    ladder: bool = False
    each: bool = False
    variants: list[list[str]] | None = None
    peers: list[str] = field(default_factory=list)
    sweep: SweepConfig | None = None
    results_dir: str = "results"
    replace: bool = False
    threads: int | None = None
    seed: int = 0
    check_alone: bool = False
    peer_python: str | None = None  # the vllm peer's interpreter (default: its install's venv)
    # set by the orchestrator for its worker subprocesses
    role: str = "main"
    worker_out: str | None = None
    reference: str | None = None
    peer: str | None = None
    bandwidth: float | None = None
    round: int = 0

    def check(self) -> None:
        _require(self.rounds >= 1, "bench.rounds", self.rounds, ">= 1")
        _require(self.repeats >= 1, "bench.repeats", self.repeats, ">= 1")
        _require(self.warmup >= 0, "bench.warmup", self.warmup, ">= 0")
        _positive_or_none("bench.threads", self.threads, "torch's default")
        _require(self.role in ("main", "worker"), "bench.role", self.role, "main or worker")
        if self.variants and any(not row for row in self.variants):
            raise RecipeError("bench.variants: every row needs at least one opt")


@dataclass
class ModelConfig:
    name: str = MISSING
    architecture: str = MISSING  # the transformers class; a recipe runs only its own
    path: str | None = None
    scale: str = "small"
    dtype: str = "auto"
    seed: int = 0
    allow_pickle: bool = False
    allow_random_full: bool = False
    common: dict[str, Any] = field(default_factory=dict)
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class HardwareConfig:
    device: str = "auto"
    name: str | None = None
    mem_bw_gbs: float | None = None
    spec: dict[str, Any] = field(
        default_factory=dict
    )  # the planner's model (common/parallel/hardware.py)

    def check(self) -> None:
        _positive_or_none("hardware.mem_bw_gbs", self.mem_bw_gbs, "probe")


@dataclass
class WorkloadConfig:
    """Keys every workload has; request counts and lengths are checked where requests are
    built (common/bench/workload.py), which the preflight runs."""

    kind: str = MISSING
    max_new_tokens: Any = MISSING  # an int, or [lo, hi]
    batch_size: int = 1
    ignore_eos: bool = False
    seed: int = 0

    def check(self) -> None:
        _require(self.batch_size > 0, "workload.batch_size", self.batch_size, "> 0")


@dataclass
class LatencyWorkload(WorkloadConfig):
    num_prompts: int = MISSING
    prompt_len: int = MISSING


@dataclass
class ThroughputWorkload(WorkloadConfig):
    num_requests: int = MISSING
    prompt_len: Any = MISSING
    new_tokens_dist: str = "uniform"
    new_tokens_mean: float | None = None


@dataclass
class SharedPrefixWorkload(WorkloadConfig):
    num_prompts: int = MISSING
    prefix_len: int = MISSING
    prompt_len: Any = MISSING


@dataclass
class OnlineWorkload(WorkloadConfig):
    num_requests: int = MISSING
    rate: float = MISSING
    prompt_len: Any = MISSING
    slo_ttft_ms: float = MISSING
    slo_tpot_ms: float = MISSING


@dataclass
class VLWorkload(WorkloadConfig):
    """Text + images per request: generated (seeded synthetic images) or a JSONL file."""

    num_requests: int = 16
    path: str | None = None
    prompt_len: int = 32
    images_per_request: int = 1
    image_size: list[int] = field(default_factory=lambda: [560, 560])
    repeat: float = 0.5
    min_pixels: int | None = None
    max_pixels: int | None = None

    def check(self) -> None:
        super().check()
        _require(0 <= self.repeat <= 1, "workload.repeat", self.repeat, "in [0, 1]")
        _require(
            len(self.image_size) == 2 and min(self.image_size) >= 28,
            "workload.image_size", self.image_size, "[height, width], each >= 28 pixels",
        )  # fmt: skip


@dataclass
class FileWorkload(WorkloadConfig):
    path: str = MISSING
    max_new_tokens: int = 64  # a line's own "max_new_tokens" overrides it


WORKLOADS: dict[str, type[WorkloadConfig]] = {
    "latency": LatencyWorkload,
    "throughput": ThroughputWorkload,
    "shared_prefix": SharedPrefixWorkload,
    "online": OnlineWorkload,
    "file": FileWorkload,
    "vl": VLWorkload,
}


@dataclass
class RecipeConfig:
    recipe: str = MISSING
    opts: dict[str, OptSpec] = field(default_factory=dict)
    workload: Any = MISSING  # one of WORKLOADS, by its kind (checked before the scheduler)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    offload: str = "none"  # none | cpu | disk: decoder layers streamed in ahead of use
    offload_dir: str | None = None  # disk: where the layer file goes (null: a temp dir)
    offload_cold: bool = False  # disk: drop the file's page cache before each forward
    compile: CompileConfig = field(default_factory=CompileConfig)
    fast_linear: bool = False  # float linears through the dispatched bf16_linear op
    kernels: dict[str, str | None] = field(default_factory=dict)  # op -> pinned implementation
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    spec: SpecDecodeConfig = field(default_factory=SpecDecodeConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or "config"
    if isinstance(e, MissingMandatoryValue):
        return f"{key} must be set, e.g. {key}=... on the command line"
    if isinstance(e, ConfigKeyError):
        return f"unknown config key {key!r}"
    reason = str(getattr(e, "msg", e)).splitlines()[0]
    return f"{key}: {reason}"


def _check_all(node: Any) -> None:
    if is_dataclass(node):
        if hasattr(node, "check"):
            node.check()
        for f in fields(node):
            _check_all(getattr(node, f.name))


def typed(cfg: DictConfig) -> RecipeConfig:
    """The composed config as dataclasses: unknown keys, wrong types, missing values and
    out-of-range values are one RecipeError naming the key."""
    kind = cfg.workload.get("kind")
    if kind not in WORKLOADS:
        raise RecipeError(f"unknown workload.kind {kind!r}; choose one of {', '.join(WORKLOADS)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RecipeConfig), cfg)
        merged.workload = OmegaConf.merge(OmegaConf.structured(WORKLOADS[kind]), cfg.workload)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise RecipeError(_describe(e)) from e
    _check_all(config)
    return config
