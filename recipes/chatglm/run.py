"""ChatGLM (GLM-4) recipe: python recipes/chatglm/run.py +opt=flash_attn,int8"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common.bench.cli import run_recipe  # noqa: E402
from models.glm import GlmForCausalLM  # noqa: E402

if __name__ == "__main__":
    run_recipe("chatglm", GlmForCausalLM)
