"""Qwen2-VL and Qwen2.5-VL: a NaViT-style vision tower feeding a Qwen2 decoder with M-RoPE.

Vision: 3-D patch embedding (2 frames x 14 x 14 pixels), 2-D rotary attention over images of
any size in one flat sequence, and a merger that concatenates 2 x 2 patches and projects
them to the decoder's width. Qwen2.5-VL's tower uses RMSNorm, a SwiGLU MLP, and windowed
attention except in its `fullatt_block_indexes` blocks. Language: the Qwen2 decoder (biased
q/k/v, GQA) whose rotary positions have three axes (temporal, height, width; `mrope_section`
frequencies each); each image's placeholder tokens are replaced by its merged features and
get grid coordinates as positions (transformers' get_rope_index).

Parameter names match transformers 5 (`model.visual.*`, `model.language_model.*`,
`lm_head`); checkpoints in the earlier layout (`visual.*`, `model.*`) load through the same
renames transformers applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from common.core.errors import RecipeError
from common.core.request import MultimodalItem
from common.nn.causal_lm import ModelArgs, MultimodalLM, pre_norm_decoder
from common.nn.decoder import DecoderModel
from common.nn.mlp import GatedMLP
from common.nn.norm import RMSNorm
from common.nn.rotary import MultiAxisRotaryEmbedding
from common.nn.vision import PatchEmbed3D, PatchMerger, VisionBlock, VisionMLP, VisionTransformer

VISION_EPS = 1e-6


@dataclass(frozen=True)
class Qwen2VLArgs(ModelArgs):
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    vision_config: dict = field(default_factory=dict)  # transformers' vision_config keys
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    pad_token_id: int | None = None  # unused by inference; kept so configs round-trip

    @property
    def biases(self) -> tuple[bool, bool, bool]:
        return True, False, False  # Qwen2: q/k/v biased

    @property
    def vision(self) -> dict:
        """The vision config with transformers' defaults filled in."""
        base = dict(
            depth=32, embed_dim=1280, hidden_act="quick_gelu", mlp_ratio=4, num_heads=16,
            in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        )  # fmt: skip
        return {**base, **self.vision_config, "hidden_size": self.hidden_size}

    @classmethod
    def from_hf_config(cls, d: dict) -> Qwen2VLArgs:
        # transformers 5 nests the decoder in text_config; published configs are flat.
        text = {**d, **(d.get("text_config") or {})}
        rope = {**(text.get("rope_scaling") or {}), **(text.get("rope_parameters") or {})}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "mrope"):
            raise RecipeError(f"{cls.__name__}: unsupported rope_type {kind!r}; supported: mrope")
        text["rope_theta"] = rope.get("rope_theta", text.get("rope_theta", cls.rope_theta))
        text["mrope_section"] = list(rope.get("mrope_section", [16, 24, 24]))
        # token ids and tying live at the top level (tying inside text_config before 5.x)
        top = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        text.update({k: d[k] for k in (*top, "tie_word_embeddings") if k in d})
        vision = {k: v for k, v in (d.get("vision_config") or {}).items() if k in cls.vision_keys}
        return cls.from_dict({**text, "vision_config": vision})

    vision_keys = (
        "depth", "embed_dim", "hidden_act", "mlp_ratio", "num_heads", "in_channels",
        "patch_size", "spatial_merge_size", "temporal_patch_size",
    )  # fmt: skip

    def to_hf_config(self) -> dict:
        """kwargs of transformers' config class (oracle tests, saving)."""
        skip = ("rope_theta", "mrope_section", "vision_config", "head_dim")
        text = {k: v for k, v in self.__dict__.items() if k not in skip}
        text["rope_parameters"] = {
            "rope_type": "default",
            "mrope_section": list(self.mrope_section),
            "rope_theta": self.rope_theta,
        }
        top = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        return {
            "text_config": {k: v for k, v in text.items() if k not in top},
            "vision_config": self.hf_vision_config(),
            "tie_word_embeddings": self.tie_word_embeddings,
            **{k: text[k] for k in top},
        }

    def hf_vision_config(self) -> dict:
        return {k: v for k, v in self.vision.items() if k in (*self.vision_keys, "hidden_size")}


@dataclass(frozen=True)
class Qwen2_5_VLArgs(Qwen2VLArgs):
    vision_keys = (
        "depth", "hidden_size", "hidden_act", "intermediate_size", "num_heads", "in_channels",
        "patch_size", "spatial_merge_size", "temporal_patch_size", "window_size",
        "fullatt_block_indexes", "tokens_per_second",
    )  # fmt: skip

    @property
    def vision(self) -> dict:
        base = dict(
            depth=32, hidden_size=1280, hidden_act="silu", intermediate_size=3420, num_heads=16,
            in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=4,
        )  # fmt: skip
        return {**base, **self.vision_config, "out_hidden_size": self.hidden_size}

    def hf_vision_config(self) -> dict:
        keep = (*self.vision_keys, "out_hidden_size")
        return {k: v for k, v in self.vision.items() if k in keep}


def qwen2_vl_vision(v: dict) -> VisionTransformer:
    """Qwen2-VL's tower: LayerNorm, fc1/fc2 MLP (quick GELU), every block over whole images."""
    dim, heads, merge = v["embed_dim"], v["num_heads"], v["spatial_merge_size"]
    norm = partial(nn.LayerNorm, dim, eps=VISION_EPS)
    blocks = [
        VisionBlock(dim, heads, VisionMLP(dim, dim * v["mlp_ratio"], v["hidden_act"]), norm)
        for _ in range(v["depth"])
    ]
    embed = PatchEmbed3D(v["patch_size"], v["temporal_patch_size"], v["in_channels"], dim)
    merger = PatchMerger(dim, v["hidden_size"], merge, norm())
    return VisionTransformer(embed, blocks, merger, dim // heads, merge)


def qwen2_5_vl_vision(v: dict) -> VisionTransformer:
    """Qwen2.5-VL's tower: RMSNorm, biased SwiGLU MLP, windows of window_size pixels except in
    the full-attention blocks."""
    dim, heads, merge = v["hidden_size"], v["num_heads"], v["spatial_merge_size"]
    if v["hidden_act"] != "silu":
        raise RecipeError(f"Qwen2.5-VL vision: hidden_act {v['hidden_act']!r}; supported: silu")
    norm = partial(RMSNorm, dim, VISION_EPS)
    blocks = [
        VisionBlock(dim, heads, GatedMLP(dim, v["intermediate_size"], bias=True), norm)
        for _ in range(v["depth"])
    ]
    embed = PatchEmbed3D(v["patch_size"], v["temporal_patch_size"], v["in_channels"], dim)
    merger = PatchMerger(dim, v["out_hidden_size"], merge, norm())
    window = v["window_size"] // merge // v["patch_size"]
    full = tuple(v["fullatt_block_indexes"])
    return VisionTransformer(embed, blocks, merger, dim // heads, merge, window, full)


def qwen2_decoder(args: Qwen2VLArgs) -> DecoderModel:
    rotary = MultiAxisRotaryEmbedding(args.kv_head_dim, args.rope_theta, args.mrope_section)
    mlp = lambda: GatedMLP(args.hidden_size, args.intermediate_size)  # noqa: E731
    return pre_norm_decoder(args, rotary, mlp, args.rms_norm_eps, qkv_bias=True)


class Qwen2VLModel(nn.Module):
    """transformers' `model`: the vision tower and the decoder side by side."""

    def __init__(self, visual: VisionTransformer, language_model: DecoderModel) -> None:
        super().__init__()
        self.visual, self.language_model = visual, language_model


class Qwen2VLForConditionalGeneration(MultimodalLM):
    args_cls = Qwen2VLArgs
    hf_class_name = "Qwen2VLForConditionalGeneration"
    vision_tower = staticmethod(qwen2_vl_vision)
    encoder_modules = ("model.visual",)  # int8 / fusion opts quantize the language half
    # the pre-5 layout, renamed as transformers' conversion mapping does
    checkpoint_renames = (
        (r"^visual\.", "model.visual."),
        (r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
    )

    def __init__(self, args: Qwen2VLArgs) -> None:
        super().__init__(args)
        if args.kv_head_dim * args.num_attention_heads != args.hidden_size:
            raise RecipeError("Qwen2-VL needs hidden_size = num_attention_heads * head_dim")
        self.model = Qwen2VLModel(self.vision_tower(args.vision), qwen2_decoder(args))
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.tied_weights = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    image_processor = "Qwen2VLImageProcessorPil"

    def image_processor_config(self) -> dict:
        v = self.args.vision
        return {
            "patch_size": v["patch_size"],
            "temporal_patch_size": v["temporal_patch_size"],
            "merge_size": v["spatial_merge_size"],
        }

    def image_placeholder(self, length: int) -> tuple[list[int], int]:
        a = self.args
        return [a.vision_start_token_id, *[a.image_token_id] * length, a.vision_end_token_id], 1

    @property
    def merge(self) -> int:
        return self.model.visual.merge

    def forward(self, input_ids: Tensor, positions: Tensor, ctx, **extra: Tensor) -> Tensor:
        return self.model.language_model(input_ids, positions, ctx, **extra)

    def encode(self, items: list[MultimodalItem]) -> list[Tensor]:
        """Every item's image through the tower in one flat sequence; features per item."""
        grids = [self._grid(it) for it in items]
        pixels = torch.cat([it.inputs["pixel_values"] for it in items])
        weight = self.model.visual.patch_embed.proj.weight
        features = self.model.visual(pixels.to(weight.device), grids)
        return list(features.split([it.length for it in items]))

    def _grid(self, item: MultimodalItem) -> list[int]:
        t, h, w = (int(x) for x in torch.as_tensor(item.inputs["image_grid_thw"]).flatten())
        if t * h * w != item.length * self.merge**2:
            raise RecipeError(
                f"an image with grid {t}x{h}x{w} needs {t * h * w // self.merge**2} "
                f"placeholder tokens, the prompt has {item.length}"
            )
        return [t, h, w]

    def rope_table(self, prompt_len: int, items: list[MultimodalItem]) -> tuple[Tensor, int]:
        """transformers' get_rope_index for one prompt: text tokens count on; an image's
        tokens get (t, row, column) offset by the position where it starts, and the text
        after it starts past max(rows, columns)."""
        parts, pos, end = [], 0, 0
        for it in sorted(items, key=lambda it: it.start):
            text = it.start - end
            parts.append((torch.arange(text) + pos).expand(3, -1))
            pos += text
            t, h, w = self._grid(it)
            gh, gw = h // self.merge, w // self.merge
            grid = torch.meshgrid(
                torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij"
            )
            parts.append(torch.stack(grid).reshape(3, -1) + pos)
            pos += max(gh, gw)
            end = it.start + it.length
        parts.append((torch.arange(prompt_len - end) + pos).expand(3, -1))
        table = torch.cat(parts, dim=1)
        return table, int(table.max()) + 1 - prompt_len


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    args_cls = Qwen2_5_VLArgs
    hf_class_name = "Qwen2_5_VLForConditionalGeneration"
    vision_tower = staticmethod(qwen2_5_vl_vision)
