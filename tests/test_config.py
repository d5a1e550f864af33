"""The typed config and the preflight, in process: every check a worker used to make late."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from common.bench.cli import compose_config, rewrite_opt_args
from common.bench.destination import claim, identity_hash, run_identity
from common.bench.plan import MAX_NAME, plan, results_name
from common.bench.preflight import preflight
from common.core.config import CONFIG_DIR, typed
from common.core.errors import RecipeError
from common.transforms.registry import check_combination, opt_specs
from models.glm import GlmForCausalLM
from models.llama import LlamaForCausalLM

TINY = ["model.scale=tiny", "hardware=cpu"]


def checked(*args: str, recipe: str = "llama65b", model_cls: type = LlamaForCausalLM):
    cfg = compose_config(recipe, rewrite_opt_args([*TINY, *args]))
    return preflight(cfg, model_cls)


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench.threads=-3"], "bench.threads must be > 0 (null = torch's default), got -3"),
        (["bench.threads=abc"], "bench.threads: Value 'abc' of type 'str' could not be"),
        (["+opt=paged_kv", "scheduler.kv_budget=0"], "scheduler.kv_budget must be > 0"),
        (["workload.batch_size=0"], "workload.batch_size must be > 0, got 0"),
        (["workload.max_new_tokens=0"], "max_new_tokens must be > 0, got 0"),
        (["workload=throughput", "workload.num_requests=0"], "workload.num_requests must be > 0"),
        (["workload=online", "workload.rate=0"], "workload.rate must be > 0"),
        (["workload=file", "workload.path=/nope.jsonl"], "workload.path '/nope.jsonl' is not a"),
        (["workload=file"], "workload.path must be set"),
        (
            ["bench.peers=[ollama]"],
            "unknown bench.peers entry 'ollama'; choose one of hf, llama_cpp, vllm",
        ),
        (["attention.backend=fast"], "unknown attention.backend 'fast'; choose one of eager"),
        (["scheduler.policy=lifo"], "unknown scheduler.policy 'lifo'"),
        (["+model.bogus=1"], "unknown config key 'model.bogus'"),
        (["generation.top_p=0"], "sampling: top_p=0"),
        (["bench.repeats=0"], "bench.repeats must be >= 1, got 0"),
        (["hardware.mem_bw_gbs=-1"], "hardware.mem_bw_gbs must be > 0"),
        (["kv_cache.block_size=0"], "kv_cache.block_size must be > 0, got 0"),
        (["+opt=no_kv_cache,paged_kv"], "opts 'no_kv_cache' and 'paged_kv' conflict"),
        (["+opt=static_kv,cont_batch"], "opts 'static_kv' and 'cont_batch' conflict"),
        (["+opt=prefix_cache"], "opt 'prefix_cache' requires paged_kv; add it, e.g. +opt="),
        (["bench.variants=[[flash_attn],[bogus]]"], "unknown opt 'bogus'; available: "),
        (["bench.variants=[[paged_kv,static_kv]]"], "opts 'paged_kv' and 'static_kv' conflict"),
        (
            ["+opt=int8", "bench.variants=[[int8]]"],
            "give the rows either as +opt=... or as bench.variants",
        ),
        (["model=glm4_9b"], "model 'glm-4-9b' (GlmForCausalLM) does not run in this recipe"),
        (["model.path=/nope"], "model directory /nope does not exist"),
        (["scheduler.preemption=drop"], "unknown scheduler.preemption 'drop'"),
        (
            ["quant.weights=int3"],
            "unknown quantization scheme 'int3'; choose none or int8, w8a8, int4, w4a8, gptq, awq",
        ),
        (["quant.group_size=48"], "quant.group_size must be one of 32, 64, 128, got 48"),
        (
            ["bench.variants=[[int4,'quant.nope=1']]"],
            "bench.variants override 'quant.nope=1': unknown",
        ),
        (["bench.variants=[[int4,'quant.group_size=48']]"], "quant.group_size must be one of"),
        (["quant.skip=[layers.99]"], "quant.skip entry 'layers.99' names no quantizable module"),
        (["kernels.int8_linear=fast"], "unknown kernel 'fast' for int8_linear; choose one of"),
        (["kernels.paged_attention=fast"], "unknown kernel 'fast' for paged_attention"),
        (["kernels.matmul=cpp"], "unknown config key 'kernels.matmul'"),
    ],
)
def test_bad_config_fails_before_any_worker(args: list[str], message: str) -> None:
    with pytest.raises(RecipeError, match="^" + re.escape(message)):
        checked(*args)


def test_another_recipes_model_names_this_recipes_choices() -> None:
    with pytest.raises(RecipeError, match="which runs GlmForCausalLM; choose model=glm4_9b$"):
        checked("model=llama65b", recipe="chatglm", model_cls=GlmForCausalLM)


def test_a_good_config_is_typed_and_planned() -> None:
    c = checked("+opt=flash_attn,int8", "workload=throughput", "bench.ladder=true")
    assert type(c.config.workload).__name__ == "ThroughputWorkload"
    assert c.config.scheduler.max_batch == c.config.workload.batch_size == 16
    assert [(v.name, v.opts) for v in c.variants] == [
        ("baseline", []),
        ("+flash_attn", ["flash_attn"]),
        ("+flash_attn +int8", ["flash_attn", "int8"]),
    ]


def test_each_runs_an_opt_with_what_it_requires() -> None:
    specs = opt_specs(CONFIG_DIR)
    variants = plan(["prefix_cache", "int8"], False, True, ["hf"], None, specs)
    assert [(v.name, v.opts, v.peer) for v in variants] == [
        ("baseline", [], None),
        ("paged_kv+prefix_cache", ["paged_kv", "prefix_cache"], None),
        ("int8", ["int8"], None),
        ("hf generate()", [], "hf"),
    ]


def test_opt_declarations_are_consistent() -> None:
    """Conflicts are declared on both sides; requirements name existing, compatible opts."""
    specs = opt_specs(CONFIG_DIR)
    for name, spec in specs.items():
        for other in spec.conflicts:
            assert name in specs[other].conflicts, f"{other} does not list {name}"
        for req in spec.requires:
            check_combination([req, name], specs)


def test_typed_config_matches_every_shipped_choice() -> None:
    """Every model, workload and hardware file fits the schema."""
    for group in ("workload", "hardware", "model"):
        for p in sorted((CONFIG_DIR / group).glob("*.yaml")):
            extra = ["workload.path=x.jsonl"] if p.stem == "file" else []
            typed(compose_config("llama65b", [f"{group}={p.stem}", *extra]))


# ---------------------------------------------------------------- where results go


def identity(*args: str) -> dict:
    return run_identity(compose_config("llama65b", [*TINY, *args]))


def test_the_results_dir_must_be_writable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    stem = tmp_path / "file" / "x" / "latency-baseline"
    with (
        pytest.raises(RecipeError, match="bench.results_dir: cannot write to"),
        claim(stem, identity(), "cmd"),
    ):
        pass


def test_another_run_never_replaces_results(tmp_path: Path) -> None:
    stem = tmp_path / "latency-flash_attn+int8"
    small, tiny = identity("model.scale=small"), identity()
    stem.with_name(stem.name + ".json").write_text(f'{{"config_hash": "{identity_hash(small)}"}}')
    with claim(stem, small, "cmd") as same:
        assert same.stem == stem and same.displaced is None  # the same run: replaced in place
    with claim(stem, tiny, "cmd") as other:
        assert other.stem.name == f"latency-flash_attn+int8@{identity_hash(tiny)}"
        assert other.displaced == stem
    with claim(stem, tiny, "cmd", replace=True) as forced:  # bench.replace=true
        assert forced.stem == stem
    assert identity("bench.results_dir=elsewhere") == tiny  # where results go is not identity


def test_results_from_before_the_hash_are_known_by_their_command(tmp_path: Path) -> None:
    stem = tmp_path / "latency-baseline"
    stem.with_name(stem.name + ".json").write_text('{"command": "python run.py"}')
    with claim(stem, identity(), "python run.py") as same:
        assert same.stem == stem
    with claim(stem, identity(), "python run.py model.scale=tiny") as other:
        assert other.stem != stem


def test_two_runs_at_once_do_not_share_a_name(tmp_path: Path) -> None:
    stem = tmp_path / "latency-baseline"
    tiny, small = identity(), identity("model.scale=small")
    with claim(stem, tiny, "cmd") as first:
        assert first.stem == stem
        with claim(stem, small, "cmd") as second:  # other settings: their own name
            assert second.stem.name == f"latency-baseline@{identity_hash(small)}"
        with (
            pytest.raises(RecipeError, match="the same run is already writing"),
            claim(stem, tiny, "cmd"),
        ):
            pass
    assert not list(tmp_path.glob(".*.lock"))


def test_a_dead_runs_lock_is_taken_over(tmp_path: Path) -> None:
    stem = tmp_path / "latency-baseline"
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a pid that no longer runs
    (tmp_path / ".latency-baseline.lock").write_text(f"{pid} {identity_hash(identity())}")
    with claim(stem, identity(), "cmd") as dest:
        assert dest.stem == stem


def test_a_long_row_list_still_names_a_file(tmp_path: Path) -> None:
    """Rows with long overrides: the name is cut and hashed, so the results still write, and
    another row list never shares it."""
    rows = [["gptq", f"quant.skip=[lm_head,layers.{i}.mlp,layers.29.mlp]"] for i in range(12)]
    cfg = compose_config("llama65b", TINY)
    name = results_name(cfg, [], rows)
    assert len(name.encode()) <= MAX_NAME and name.startswith("latency-vs-gptq+quant_skip=")
    assert results_name(cfg, [], rows[:-1]) != name
    with claim(tmp_path / name, identity(), "cmd") as dest:
        dest.stem.with_name(dest.stem.name + "@01234567.json").write_text("{}")
