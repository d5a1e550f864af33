"""What tests/test_parallel.py runs on one device and on two ranks alike."""

from pathlib import Path

import torch
import transformers

from common.core.request import Request
from common.device.select import Device
from common.engine.engine import Engine
from common.engine.scheduler import SchedulerParams
from common.io.checkpoint import from_pretrained
from common.kv.spec import KVSpec
from common.quant.int8 import Int8WeightOnly
from common.transforms.fusion import fuse_projections
from models.glm import GlmArgs, GlmForCausalLM
from models.llama import LlamaArgs, LlamaForCausalLM

MODELS = {
    # 1 KV head for 2 ranks: replicated; tied head; a vocabulary that does not split evenly
    "llama": (
        LlamaForCausalLM,
        LlamaArgs(
            vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
            tie_word_embeddings=True,
        ),
    ),
    # 2 KV heads split; q/k/v biases; fused gate_up MLP
    "glm": (
        GlmForCausalLM,
        GlmArgs(
            vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        ),
    ),
}  # fmt: skip
# opts as the engine sees them
CASES = {
    "rows": {"kv": KVSpec("contiguous"), "attention": "eager"},
    "paged": {
        "kv": KVSpec("paged", block_size=4),
        "attention": "flash",
        "scheduler": SchedulerParams("continuous", max_batch=2),
    },
    "int8": {"kv": KVSpec("contiguous", int8=True), "attention": "flash", "int8": True},
    # group-wise int8: 32 inputs per scale, so the row-parallel shards (16 and 32 inputs on
    # each of 2 ranks) hold a partial group and whole groups
    "int8_g32": {"kv": KVSpec("contiguous"), "attention": "flash", "int8": 32},
}
PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13]]
NEW_TOKENS = [8, 5, 7]


def save_checkpoint(name: str, path: Path) -> Path:
    cls, args = MODELS[name]
    hf_cls = getattr(transformers, cls.hf_class_name)
    # initializer_range 0.5: random weights that do not repeat one token forever
    config = hf_cls.config_class(**args.to_hf_config(), initializer_range=0.5)
    torch.manual_seed(0)
    hf_cls(config).save_pretrained(path / name)
    return path / name


def load(path: str | Path, opts: dict, place=None):
    cls = MODELS[Path(path).name][0]
    model = from_pretrained(cls, path, "cpu", torch.float32, place=place)
    if opts.get("int8"):
        group = 0 if opts["int8"] is True else opts["int8"]
        model = Int8WeightOnly(group).quantize(fuse_projections(model))
    return model


def generate(model, device: Device, opts: dict) -> dict:
    """Greedy tokens of three requests, and teacher-forced logits of the first."""
    if isinstance(model, torch.nn.Module):
        runner = Engine(model, device, opts["kv"], opts["attention"], opts.get("scheduler"))
    else:  # a pipeline stage
        runner = model
    reqs = [Request(p, n, ignore_eos=True) for p, n in zip(PROMPTS, NEW_TOKENS)]
    tokens = [c.tokens for c in runner.generate(reqs)]
    logits = runner.teacher_forced_logits(PROMPTS[0], tokens[0])
    return {"tokens": tokens, "logits": logits}
