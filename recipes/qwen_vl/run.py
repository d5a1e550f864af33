"""Qwen-VL recipe: python recipes/qwen_vl/run.py +opt=vision_cache (model=qwen2_5_vl for 2.5)"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common.bench.cli import run_recipe  # noqa: E402
from models.qwen2_vl import (  # noqa: E402
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

if __name__ == "__main__":
    run_recipe("qwen_vl", Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
