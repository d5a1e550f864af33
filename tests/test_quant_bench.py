"""The bench side of quantization: rows with their own overrides, perplexity, chat prompts."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from tiny import TINY_LLAMA

from common.bench.fidelity import perplexity
from common.bench.plan import plan, split_row
from common.bench.runners import engine_runner
from common.bench.workload import file_requests
from common.core.config import CONFIG_DIR
from common.core.errors import RecipeError
from common.device.select import Device
from common.engine.engine import Engine
from common.io.checkpoint import from_seed
from common.transforms.calibrate import _Causal
from common.transforms.registry import opt_specs
from models.llama import LlamaForCausalLM


def test_variant_rows_carry_their_own_overrides() -> None:
    rows = [["int4"], ["int4", "quant.group_size=32"], ["gptq", "kv_int8", "quant.act_order=true"]]
    variants = plan([], False, False, [], rows, opt_specs(CONFIG_DIR))
    assert [v.name for v in variants] == [
        "baseline", "int4", "int4 group_size=32", "gptq+kv_int8 act_order=true",
    ]  # fmt: skip
    assert variants[2].opts == ["int4"] and variants[2].overrides == ["quant.group_size=32"]
    assert split_row(["a", "k.x=1"]) == (["a"], ["k.x=1"])
    with pytest.raises(RecipeError, match="opts 'int4' and 'gptq' conflict"):
        plan([], False, False, [], [["int4", "gptq", "quant.bits=8"]], opt_specs(CONFIG_DIR))


def test_perplexity_is_exp_of_the_mean_next_token_loss() -> None:
    model = from_seed(LlamaForCausalLM, TINY_LLAMA, 0, "cpu", torch.float32)
    blocks = torch.randint(3, TINY_LLAMA.vocab_size, (3, 20))
    runner = engine_runner(Engine(model, Device("cpu")), None, 0)
    got = perplexity(runner, blocks)
    with torch.no_grad():
        logits = model.logits(model(blocks, torch.arange(20).expand(3, 20), _Causal()))
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), blocks[:, 1:].flatten())
    assert got == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert 1 < got < 10 * TINY_LLAMA.vocab_size


def _chat_tokenizer(template: bool) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = ["<|user|> <|assistant|> what is the capital of france ?"]
    tok.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=["<unk>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    if template:
        fast.chat_template = (
            "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}"
        )
    return fast


def test_chat_prompts_are_rendered_with_the_chat_template(tmp_path) -> None:
    path = tmp_path / "chat.jsonl"
    messages = [{"role": "user", "content": "what is the capital of france ?"}]
    path.write_text(json.dumps({"messages": messages}) + "\n")
    tok = _chat_tokenizer(True)
    (req,) = file_requests(str(path), 8, tok, False)
    expected = tok("<|user|> what is the capital of france ? <|assistant|>")["input_ids"]
    assert req.prompt == expected and tok.convert_ids_to_tokens(expected)[-1] == "|>"
    with pytest.raises(
        RecipeError, match=r"chat.jsonl:1: chat messages need a tokenizer with a chat"
    ):
        file_requests(str(path), 8, _chat_tokenizer(False), False)
    path.write_text(json.dumps({"messages": "hi"}) + "\n")
    with pytest.raises(RecipeError, match=r"chat.jsonl:1: messages must be a list"):
        file_requests(str(path), 8, tok, False)


def test_shipped_chat_prompts_are_chat_messages() -> None:
    lines = (CONFIG_DIR.parent / "configs/workload/chat_prompts.jsonl").read_text().splitlines()
    assert len(lines) >= 20
    assert all(json.loads(line)["messages"][0]["role"] == "user" for line in lines)
