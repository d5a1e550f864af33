"""Workload files: every bad line is one `FILE:LINE: what is wrong`, never an internal error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from common.bench.workload import file_requests
from common.core.errors import RecipeError


def _file(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_reads_ids_and_per_line_max_new_tokens(tmp_path: Path) -> None:
    rows = [{"prompt_ids": [3, 4]}, {"prompt_ids": [5], "max_new_tokens": 2}]
    path = _file(tmp_path, json.dumps(rows[0]), "", json.dumps(rows[1]))
    requests = file_requests(path, 7, tokenizer=None, ignore_eos=True)
    assert [(r.prompt, r.max_new_tokens) for r in requests] == [([3, 4], 7), ([5], 2)]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("5", "each line must be a JSON object .* got int 5"),
        ('"prompt_ids"', "each line must be a JSON object .* got str"),
        ("[1, 2]", "each line must be a JSON object .* got list"),
        ('{"prompt_ids": [1, 2], "max_new_tokens": "abc"}', "max_new_tokens must be an int > 0, got 'abc'"),
        ('{"prompt_ids": [1, 2], "max_new_tokens": null}', "max_new_tokens must be an int > 0, got None"),
        ('{"prompt_ids": [1, 2], "max_new_tokens": 2.5}', "max_new_tokens must be an int > 0, got 2.5"),
        ('{"prompt_ids": [1, 2], "max_new_tokens": true}', "max_new_tokens must be an int > 0, got True"),
        ('{"prompt_ids": [1, 2], "max_new_tokens": 0}', "max_new_tokens must be an int > 0, got 0"),
        ('{"prompt_ids": [true, false]}', "prompt_ids must be a list of ints"),
        ('{"prompt_ids": "1 2"}', "prompt_ids must be a list of ints"),
        ('{"prompt": 5}', "prompt must be a string"),
        ('{"text": "hi"}', "each line needs 'prompt' .* or 'prompt_ids'"),
        ("{bad", "not valid JSON"),
    ],
)  # fmt: skip
def test_bad_line_names_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    path = _file(tmp_path, json.dumps({"prompt_ids": [3]}), line)
    with pytest.raises(RecipeError, match=f"^{re.escape(path)}:2: {problem}") as info:
        file_requests(path, 4, tokenizer=None, ignore_eos=True)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("max_new", ["abc", 0, True])
def test_bad_default_max_new_tokens_names_the_key(tmp_path: Path, max_new) -> None:
    path = _file(tmp_path, json.dumps({"prompt_ids": [3]}))
    with pytest.raises(RecipeError, match="^workload.max_new_tokens must be an int > 0"):
        file_requests(path, max_new, tokenizer=None, ignore_eos=True)


def test_text_prompt_without_tokenizer(tmp_path: Path) -> None:
    path = _file(tmp_path, json.dumps({"prompt": "hello"}))
    with pytest.raises(RecipeError, match=f"^{re.escape(path)}:1: text prompts need a tokenizer"):
        file_requests(path, 4, tokenizer=None, ignore_eos=True)
