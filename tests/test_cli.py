"""The recipe command line end to end: `python recipes/llama65b/run.py ...` in subprocesses.

Every command line a test needs is listed in RUNS and named by its test's `cli_runs` marker.
The selected ones all start when the first of these tests runs, two at a time (2 cores), so
the tests below mostly wait for results that are already there. Tiny scale, one timed pass,
no warm-up; nothing here asserts speed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from omegaconf import OmegaConf

from common.bench.cli import compose_config, rewrite_opt_args
from common.bench.report import command_line, set_command_line
from common.bench.workload import build_requests
from common.core.errors import RecipeError
from common.device.select import Device
from common.transforms.registry import available_opts, check_opts_supported

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "recipes" / "llama65b" / "run.py"
CONFIGS = REPO / "configs"
FAST = [
    "model.scale=tiny",
    "bench.warmup=0",
    "bench.repeats=1",
    "bench.rounds=1",
    "bench.threads=1",
]
LATENCY = {"num_prompts": 2, "prompt_len": 8, "max_new_tokens": 3}
OPTS = "+opt=flash_attn,int8"
ALL_OPTS = ", ".join(available_opts(CONFIGS))
MAX_POS, NEW = 32, 5
PROMPT_IDS = ([5, 6, 7, 8, 9, 10], [11, 12])
TEXT = "the cat sat on the mat"
METRICS = {"ttft_ms", "tpot_ms", "tokens_per_s", "weight_bytes", "kv_bytes", "peak_mem_bytes"}


# ---------------------------------------------------------------- checkpoint and prompt files


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer trained offline on a few sentences."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [TEXT, "a dog ran in the park", "hello world"]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>"]))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>"
    )


def hf_greedy(model: transformers.LlamaForCausalLM, prompt: list[int], new: int) -> list[int]:
    """transformers' generate(), greedy, batch 1: the new tokens (ending at EOS if it stops)."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def _save_checkpoint(path: Path) -> None:
    """A random fp32 LlamaForCausalLM saved by transformers, with a tokenizer. Its EOS is the
    token it greedily emits at step 2 for PROMPT_IDS[0], so that prompt stops early."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POS,
        bos_token_id=1,
        eos_token_id=None,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    free = hf_greedy(model, PROMPT_IDS[0], NEW)
    eos = next(t for i, t in enumerate(free) if i >= 2 and t not in free[:i])
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)


@dataclass(frozen=True)
class Files:
    """Inputs shared by the command lines: checkpoints (good and broken) and prompt files."""

    ckpt: Path
    corrupt: Path
    mismatch: Path
    prompts: Path
    long_prompt: Path
    bad_line: Path

    @classmethod
    def make(cls, root: Path) -> Files:
        names = ("ckpt", "corrupt", "mismatch", "p.jsonl", "long.jsonl", "bad.jsonl")
        f = cls(*(root / n for n in names))
        _save_checkpoint(f.ckpt)
        shutil.copytree(f.ckpt, f.corrupt)
        weights = f.corrupt / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        shutil.copytree(f.ckpt, f.mismatch)
        config = json.loads((f.ckpt / "config.json").read_text())
        config["hidden_size"] //= 2  # the weights keep the old width
        (f.mismatch / "config.json").write_text(json.dumps(config))
        rows = [
            {"prompt_ids": PROMPT_IDS[0]},
            {"prompt_ids": PROMPT_IDS[1], "max_new_tokens": 3},
            {"prompt": TEXT},
        ]
        f.prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
        f.long_prompt.write_text(json.dumps({"prompt_ids": [3] * MAX_POS}) + "\n")
        f.bad_line.write_text(json.dumps(rows[0]) + "\n{not json\n")
        return f


def file_workload(f: Files, ckpt: Path | None = None, prompts: Path | None = None) -> list[str]:
    return [
        f"model.path={ckpt or f.ckpt}",
        "model.dtype=float32",
        "workload=file",
        f"workload.path={prompts or f.prompts}",
        f"workload.max_new_tokens={NEW}",
    ]


# ---------------------------------------------------------------- command lines


def latency(**changes: int | None) -> list[str]:
    """The small latency workload; a None value leaves that key to the command line."""
    items = {**LATENCY, **changes}.items()
    return [f"workload.{k}={v}" for k, v in items if v is not None]


RUNS: dict[str, Callable[[Files], list[str]]] = {  # longest first: they start first
    "ladder": lambda f: [*FAST, *latency(), OPTS, "bench.ladder=true", "bench.peers=[hf]"],
    "sweep": lambda f: ["-m", "workload.max_new_tokens=2,3", *FAST, *latency(max_new_tokens=None)],
    "smoke": lambda f: [OPTS, *FAST, *latency()],
    "file": lambda f: [*FAST, *file_workload(f)],
    "w4a8": lambda f: [*FAST, *latency(), "model.dtype=float32", "bench.variants=[[int4],[w4a8]]"],
    "alone": lambda f: [
        *FAST,
        "workload=throughput",
        "workload.num_requests=5",
        "workload.prompt_len=[3,9]",
        "workload.max_new_tokens=[2,6]",
        "workload.new_tokens_dist=uniform",
        "workload.batch_size=4",
        "model.dtype=float32",
        "bench.check_alone=true",
        "bench.variants=[[paged_kv,cont_batch,flash_attn]]",
    ],
    # bad input, found in the worker
    "missing_ckpt": lambda f: [*FAST, *file_workload(f, ckpt=f.ckpt.parent / "nope")],
    "corrupt_ckpt": lambda f: [*FAST, *file_workload(f, ckpt=f.corrupt)],
    "shape_mismatch": lambda f: [*FAST, *file_workload(f, ckpt=f.mismatch)],
    "long_prompt": lambda f: [*FAST, *file_workload(f, prompts=f.long_prompt)],
    "zero_new_tokens": lambda f: [*FAST, *latency(max_new_tokens=0)],
    "zero_repeats": lambda f: [*FAST, *latency(), "bench.repeats=0"],
    # bad input, found before any model is built
    "unknown_opt": lambda f: [*FAST, "+opt=flash_attn,bogus"],
    "unknown_single_opt": lambda f: [*FAST, "+opt=bogus"],
    "unknown_key": lambda f: [*FAST, "model.bogus=1"],
    "unsupported_opt": lambda f: [*FAST, "+opts.fake={devices:[npu]}"],
    "unknown_hardware": lambda f: [*FAST, "hardware=tpu"],
    "unknown_device": lambda f: [*FAST, "hardware.device=tpu"],
    "absent_device": lambda f: [*FAST, "hardware=npu"],
    "file_without_path": lambda f: [*FAST, "workload=file"],
    "missing_prompts": lambda f: [*FAST, *file_workload(f, prompts=f.prompts.parent / "nope")],
    "bad_prompt_line": lambda f: [*FAST, *file_workload(f, prompts=f.bad_line)],
    "conflicting_opts": lambda f: [*FAST, "+opt=no_kv_cache,paged_kv"],
    "dropped_opt": lambda f: [*FAST, "+opt=static_kv,cont_batch"],
    "empty_opt_name": lambda f: [*FAST, "+opt=flash_attn,,int8"],
    "trailing_comma": lambda f: [*FAST, "+opt=flash_attn,"],
    "other_recipes_model": lambda f: [*FAST, "model=glm4_9b"],
    "negative_threads": lambda f: [*FAST[:-1], "bench.threads=-3"],
    "zero_kv_budget": lambda f: [*FAST, "+opt=paged_kv", "scheduler.kv_budget=0"],
    "zero_batch": lambda f: [*FAST, "workload.batch_size=0"],
    "unknown_peer": lambda f: [*FAST, "bench.peers=[ollama]"],
    "unknown_backend": lambda f: [*FAST, "attention.backend=fast"],
    "help": lambda f: ["--help"],
}


@dataclass
class Run:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    cwd: Path

    @property
    def results_dir(self) -> Path:
        return self.cwd / "results"

    def result_files(self) -> list[Path]:
        return sorted(p for p in self.results_dir.rglob("*") if p.is_file())

    def result(self) -> dict:
        (path,) = [p for p in self.result_files() if p.suffix == ".json"]
        return json.loads(path.read_text())

    def assert_ok(self) -> None:
        assert self.returncode == 0, self.stderr
        assert "Traceback" not in self.stderr


def _run(key: str, args: list[str], root: Path) -> Run:
    cwd = root / key
    cwd.mkdir()
    full = [*args, f"bench.results_dir={cwd / 'results'}"]
    if not any(a.startswith(("hardware=", "hardware.device=")) for a in args):
        full.append("hardware=cpu")  # a fixed bandwidth instead of the probe
    if "-m" in args:
        full.append(f"hydra.sweep.dir={cwd / 'multirun'}")
    proc = subprocess.run(
        [sys.executable, str(RUN), *full],
        cwd=cwd,  # anything written outside results/ would show up here
        capture_output=True,
        text=True,
        timeout=600,
    )
    return Run(args, proc.returncode, proc.stdout, proc.stderr, cwd)


class Runs:
    """Starts command lines in the background, two at a time; get(key) waits for one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = Files.make(root / "inputs")
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.futures: dict[str, Future[Run]] = {}

    def start(self, keys: list[str]) -> None:
        for key in sorted(set(keys) - set(self.futures), key=list(RUNS).index):
            self.futures[key] = self.pool.submit(_run, key, RUNS[key](self.files), self.root)

    def get(self, key: str) -> Run:
        self.start([key])
        return self.futures[key].result()


@pytest.fixture(scope="module")
def runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Runs]:
    r = Runs(tmp_path_factory.mktemp("cli"))
    selected = [
        key
        for item in request.session.items
        for mark in item.iter_markers("cli_runs")
        for key in mark.args
    ]
    r.start(selected)
    yield r
    r.pool.shutdown(cancel_futures=True)


# ---------------------------------------------------------------- unit: no subprocess


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["+opt=flash_attn,int8"], ["+opt=[flash_attn,int8]"]),
        (["+opt=a,b,c", "model.scale=tiny"], ["+opt=[a,b,c]", "model.scale=tiny"]),
        (["opt=a,b"], ["opt=[a,b]"]),
        (["++opt=a,b"], ["++opt=[a,b]"]),
        (["+opt=[a,b]"], ["+opt=[a,b]"]),
        (["+opt=a"], ["+opt=a"]),
        (["workload.prompt_len=[8,16]", "bench.peers=[hf]"], None),
        (["+opts=a,b", "+xopt=a,b"], None),
        (["-m", "+opt=flash_attn,int8"], None),
        (["+opt=flash_attn,int8", "--multirun", "x=1,2"], None),
    ],
)
def test_rewrite_opt_args(argv: list[str], expected: list[str] | None) -> None:
    assert rewrite_opt_args(argv) == (argv if expected is None else expected)


def test_compose_names_available_opts() -> None:
    for argv in (["+opt=bogus"], ["+opt=[int8,bogus]"]):
        with pytest.raises(RecipeError, match=f"unknown opt 'bogus'; available: {ALL_OPTS}"):
            compose_config("llama65b", argv)
    cfg = compose_config("llama65b", rewrite_opt_args([OPTS, "model.scale=tiny"]))
    assert list(cfg.opts) == ["flash_attn", "int8"]
    assert (cfg.attention.backend, cfg.quant.weights) == ("flash", "int8")


def test_check_opts_supported() -> None:
    check_opts_supported(compose_config("llama65b", ["+opt=[flash_attn,int8]"]).opts, Device("cpu"))
    fake = OmegaConf.create({"int8": {"devices": ["cpu"]}, "fake": {"devices": ["npu", "cuda"]}})
    with pytest.raises(RecipeError, match="opt 'fake' cannot run on cpu; it supports npu, cuda"):
        check_opts_supported(fake, Device("cpu"))
    check_opts_supported(OmegaConf.create({"fake": {"devices": ["npu"]}}), Device("npu"))


@pytest.mark.parametrize(
    "workload, key", [("latency", "num_prompts"), ("throughput", "num_requests")]
)
def test_workload_without_requests_is_an_error(workload: str, key: str) -> None:
    cfg = compose_config("llama65b", [f"workload={workload}", f"workload.{key}=0"])
    with pytest.raises(RecipeError, match=f"workload.{key} must be > 0, got 0"):
        build_requests(cfg.workload, vocab=256)


def test_command_line_is_recorded_as_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    typed = [str(RUN), OPTS, "model.scale=tiny"]
    monkeypatch.setattr(sys, "argv", [str(RUN), *rewrite_opt_args(typed[1:])])
    monkeypatch.setattr("common.bench.report._TYPED_ARGV", None)
    set_command_line(typed)
    assert command_line().endswith(f"run.py {OPTS} model.scale=tiny")


# ---------------------------------------------------------------- runs that succeed


def _check_schema(result: dict) -> None:
    assert {"recipe", "command", "env", "workload", "variants"} <= result.keys()
    assert result["recipe"] == "llama65b"
    for v in result["variants"]:
        assert {"name", "opts", "metrics", "fidelity", "outputs"} <= v.keys()
        assert v["metrics"].keys() >= METRICS
        assert {"token_agreement", "max_logit_err"} <= v["fidelity"].keys()
        assert 0.0 <= v["fidelity"]["token_agreement"] <= 1.0
        assert all(isinstance(t, int) for out in v["outputs"] for t in out)
        assert v["metrics"]["weight_bytes"] > 0 and v["metrics"]["kv_bytes"] > 0


@pytest.mark.cli_runs("smoke")
def test_smoke_opts_as_typed(runs: Runs) -> None:
    run = runs.get("smoke")
    run.assert_ok()
    for cell in ("variant", "TTFT ms", "token agree", "baseline", "flash_attn+int8"):
        assert cell in run.stdout  # the table, whole even when stdout is a pipe
    stem = run.results_dir / "llama65b" / "cpu" / "latency-flash_attn+int8"
    assert run.result_files() == [stem.with_suffix(s) for s in (".json", ".md", ".png")]
    assert [p.name for p in run.cwd.iterdir()] == ["results"]  # nothing else written
    result = run.result()
    _check_schema(result)
    assert OPTS in result["command"]
    base, opt = result["variants"]
    assert (base["opts"], opt["opts"]) == ([], ["flash_attn", "int8"])
    assert base["fidelity"] == {"token_agreement": 1.0, "max_logit_err": 0.0, "same_outputs": 1.0}
    assert opt["metrics"]["weight_bytes"] < 0.6 * base["metrics"]["weight_bytes"]
    for v in result["variants"]:  # latency ignores EOS: every output has max_new_tokens
        assert [len(o) for o in v["outputs"]] == [3, 3]
    assert "| baseline |" in stem.with_suffix(".md").read_text()
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.cli_runs("ladder")
def test_ladder_and_peer_rows(runs: Runs) -> None:
    run = runs.get("ladder")
    run.assert_ok()
    result = run.result()
    _check_schema(result)
    rows = [(v["name"], v["opts"], v.get("peer")) for v in result["variants"]]
    assert rows == [
        ("baseline", [], None),
        ("+flash_attn", ["flash_attn"], None),
        ("+flash_attn +int8", ["flash_attn", "int8"], None),
        ("hf generate()", [], "hf"),
    ]
    for name, _, _ in rows:
        assert name in run.stdout


@pytest.mark.cli_runs("file")
def test_file_workload_matches_transformers_generate(runs: Runs) -> None:
    run = runs.get("file")
    run.assert_ok()
    ckpt = runs.files.ckpt
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    text_ids = transformers.AutoTokenizer.from_pretrained(ckpt)(TEXT)["input_ids"]
    prompts = [(PROMPT_IDS[0], NEW), (PROMPT_IDS[1], 3), (text_ids, NEW)]
    expected = [hf_greedy(hf, p, n) for p, n in prompts]
    (variant,) = run.result()["variants"]
    assert variant["outputs"] == expected
    assert expected[0][-1] == hf.config.eos_token_id and len(expected[0]) < NEW  # EOS stopped it
    assert len(expected[1]) == 3  # the line's own max_new_tokens


@pytest.mark.cli_runs("w4a8")
def test_w4a8_row_runs_its_kernel_and_int4s_tokens(runs: Runs) -> None:
    """+opt=w4a8 end to end next to int4: its own op runs, and the same weights with int8
    activations give int4's greedy tokens here (tests/test_w4a8.py bounds the logits)."""
    run = runs.get("w4a8")
    run.assert_ok()
    _, int4, w4a8 = run.result()["variants"]
    assert any(k.startswith("w4a8_linear[") for k in w4a8["kernels"])
    assert not any(k.startswith("int4_linear[") for k in w4a8["kernels"])  # the head is untied
    assert w4a8["outputs"] == int4["outputs"]


# ---------------------------------------------------------------- bad input


def assert_clean_error(run: Run, *fragments: str) -> None:
    """Non-zero exit, one `error:` line on stderr naming the problem, no traceback, no files."""
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "Traceback" not in run.stdout
    assert "HYDRA_FULL_ERROR" not in lines[0]  # Hydra's hint names no problem
    for fragment in fragments:
        assert fragment in lines[0]
    assert run.result_files() == []


BAD = {
    "missing_ckpt": ["nope does not exist"],
    "corrupt_ckpt": ["corrupt or unreadable safetensors", "model.safetensors"],
    "shape_mismatch": ["checkpoint shape", "!= model shape"],
    "long_prompt": [f"prompt of {MAX_POS} tokens does not fit", f"{MAX_POS} max positions"],
    "zero_new_tokens": ["max_new_tokens must be > 0, got 0"],
    "unknown_opt": [f"unknown opt 'bogus'; available: {ALL_OPTS}"],
    "unknown_single_opt": [f"unknown opt 'bogus'; available: {ALL_OPTS}"],
    "unknown_key": ["unknown config key 'model.bogus'"],
    "unsupported_opt": ["opt 'fake' cannot run on cpu; it supports npu"],
    "unknown_hardware": [
        "unknown hardware 'tpu'; available: a100_80g_x8, ascend910b_x8, auto, cpu, cuda, npu"
    ],
    "unknown_device": ["unknown device 'tpu'; choose one of auto, npu, cuda, cpu"],
    "absent_device": ["device 'npu' is not available on this machine"],
    "file_without_path": ["workload.path must be set"],
    "zero_repeats": ["bench.repeats"],
}
# Found by the preflight, before any worker starts (so no "variant ... failed:" prefix).
UPFRONT = {
    "zero_new_tokens": ["max_new_tokens must be > 0, got 0"],
    "missing_prompts": ["workload.path", "is not a file"],
    "bad_prompt_line": ["bad.jsonl:2: not valid JSON"],
    "conflicting_opts": ["opts 'no_kv_cache' and 'paged_kv' conflict"],
    "dropped_opt": ["opts 'static_kv' and 'cont_batch' conflict"],
    "empty_opt_name": ["'+opt=flash_attn,,int8' has an empty opt name", "+opt=flash_attn,int8"],
    "trailing_comma": ["'+opt=flash_attn,' has an empty opt name", "+opt=flash_attn"],
    "other_recipes_model": ["does not run in this recipe", "choose model=llama65b"],
    "negative_threads": ["bench.threads must be > 0", "got -3"],
    "zero_kv_budget": ["scheduler.kv_budget must be > 0", "got 0"],
    "zero_batch": ["workload.batch_size must be > 0, got 0"],
    "unknown_peer": ["unknown bench.peers entry 'ollama'; choose one of hf, llama_cpp, vllm"],
    "unknown_backend": ["unknown attention.backend 'fast'; choose one of eager, sdpa, flash"],
}


@pytest.mark.parametrize("case", [pytest.param(k, marks=pytest.mark.cli_runs(k)) for k in BAD])
def test_bad_input_is_one_clear_line(runs: Runs, case: str) -> None:
    assert_clean_error(runs.get(case), *BAD[case])


@pytest.mark.cli_runs("zero_repeats")
def test_zero_repeats_is_a_clear_error(runs: Runs) -> None:
    assert_clean_error(runs.get("zero_repeats"), "bench.repeats")


@pytest.mark.parametrize("case", [pytest.param(k, marks=pytest.mark.cli_runs(k)) for k in UPFRONT])
def test_bad_input_is_found_before_any_worker(runs: Runs, case: str) -> None:
    run = runs.get(case)
    assert_clean_error(run, *UPFRONT[case])
    assert "failed:" not in run.stderr  # no worker reported it: the preflight did


@pytest.mark.cli_runs("help")
def test_help_shows_the_recipe_usage(runs: Runs) -> None:
    run = runs.get("help")
    run.assert_ok()
    assert "+opt=a,b" in run.stdout and "Hydra's own options: --hydra-help" in run.stdout
    for name in available_opts(CONFIGS):
        summary = next(
            ln.lstrip("# ")
            for ln in (CONFIGS / "opt" / f"{name}.yaml").read_text().splitlines()
            if ln.startswith("# ") and not ln.startswith("# @package")
        )
        assert f"{name}" in run.stdout and summary in run.stdout
    for workload in ("latency", "throughput", "shared_prefix", "online", "file"):
        assert workload in run.stdout
    assert "models (model=NAME): llama65b\n" in run.stdout  # not the other recipe's model
    assert "model.scale=tiny|small|full" in run.stdout
    assert "Powered by Hydra" not in run.stdout


# ---------------------------------------------------------------- -m sweeps


@pytest.mark.cli_runs("sweep")
def test_multirun_sweep_runs_each_job(runs: Runs) -> None:
    run = runs.get("sweep")
    run.assert_ok()
    sweep = run.cwd / "multirun"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    wrote = [ln for ln in run.stdout.splitlines() if ln.startswith("wrote ")]
    assert sum(ln.endswith(".json") for ln in wrote) == 2  # one result per job
    jsons = [p for p in run.result_files() if p.suffix == ".json"]
    assert len(jsons) == 2 and all("." not in p.stem for p in jsons)  # no dot read as a suffix
    assert not (run.cwd / "outputs").exists()
    for path in (p for p in run.result_files() if p.suffix == ".json"):
        result = json.loads(path.read_text())  # each job's workers ran that job's values
        new = result["workload"]["max_new_tokens"]
        assert [len(o) for o in result["variants"][0]["outputs"]] == [new] * LATENCY["num_prompts"]


@pytest.mark.cli_runs("sweep")
def test_multirun_jobs_keep_their_own_results(runs: Runs) -> None:
    run = runs.get("sweep")
    found = sorted(
        json.loads(p.read_text())["workload"]["max_new_tokens"]
        for p in run.result_files()
        if p.suffix == ".json"
    )
    assert found == [2, 3]


def test_long_tailed_length_spec() -> None:
    from common.bench.workload import length_sampler, synthetic_requests

    reqs = synthetic_requests(2000, [4, 9], [8, 512], 100, 0, True, new_mean=96)
    new = [r.max_new_tokens for r in reqs]
    assert min(new) >= 8 and max(new) <= 512 and 85 < sum(new) / len(new) < 100
    assert sorted(new)[len(new) // 2] < 80  # median below the mean: a long tail
    assert new == [
        r.max_new_tokens
        for r in synthetic_requests(2000, [4, 9], [8, 512], 100, 0, True, new_mean=96)
    ]
    with pytest.raises(RecipeError, match="must lie inside max_new_tokens"):
        length_sampler([8, 50], mean=60)
    cfg = OmegaConf.load(CONFIGS / "workload" / "throughput.yaml")
    cfg.max_new_tokens = [2, 6]
    with pytest.raises(RecipeError, match="new_tokens_mean=96 must lie inside"):
        build_requests(cfg, 100)


@pytest.mark.cli_runs("alone")
def test_check_alone_reports_batch_invariance(runs: Runs) -> None:
    """fp32: every request's output under continuous batching equals running it alone."""
    run = runs.get("alone")
    run.assert_ok()
    variants = run.result()["variants"]
    assert [v["fidelity"]["same_as_alone"] for v in variants] == [1.0, 1.0]
