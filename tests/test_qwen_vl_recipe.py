"""The Qwen-VL recipe's config, presets and `vl` workload, checked in process (no workers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from vl_helpers import ARGS, synthetic_image

from common.bench.cli import compose_config, rewrite_opt_args
from common.bench.measure import _encoder_metrics
from common.bench.preflight import preflight
from common.bench.vl_workload import vl_requests
from common.core.errors import RecipeError
from common.io.checkpoint import build_empty
from common.io.presets import preset_args
from models.qwen2_vl import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

CLASSES = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
}


def cfg(*argv: str):
    return compose_config("qwen_vl", rewrite_opt_args(["model.scale=tiny", *argv]))


def tiny_model(name: str = "qwen2_vl"):
    c = cfg(f"model={name}")
    cls = CLASSES[name]
    return build_empty(lambda: cls(preset_args(c.model, cls)))


@pytest.mark.parametrize("name", CLASSES)
def test_preflight_accepts_each_model_and_vision_opts(name: str) -> None:
    checked = preflight(
        cfg(f"model={name}", "+opt=vision_cache,cont_batch,vision_overlap"), CLASSES[name]
    )
    assert [v.name for v in checked.variants] == [
        "baseline",
        "vision_cache+cont_batch+vision_overlap",
    ]
    assert checked.config.encoder.overlap and checked.config.encoder.cache_mb


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["+opt=vision_overlap"], "requires cont_batch"),
        (["bench.peers=[hf]"], "text prompts only"),
        (["workload.repeat=2"], "workload.repeat must be in"),
        (["model=qwen2_5_vl"], "does not run in this recipe"),  # checked with the Qwen2-VL class
    ],
)
def test_preflight_refuses(argv: list[str], problem: str) -> None:
    with pytest.raises(RecipeError, match=problem):
        preflight(cfg(*argv), Qwen2VLForConditionalGeneration)


def test_generated_requests_repeat_images_as_asked() -> None:
    model = tiny_model()
    w = cfg("workload.num_requests=6", "workload.image_size=[56,56]").workload

    def digests(repeat: float, seed: int = 0) -> list[bytes]:
        w.repeat, w.seed = repeat, seed
        return [m.digest for r in vl_requests(w, model) for m in r.mm_items]

    assert len(set(digests(0.0))) == 6  # every image new
    assert len(set(digests(1.0))) == 1  # the first image, again and again
    assert digests(0.5) == digests(0.5) != digests(0.5, seed=1)  # seeded
    (req, *_) = vl_requests(w, model)
    assert len(req.prompt) == 1 + 4 + 1 + w.prompt_len  # start, 2x2 merged patches, end, text
    assert req.extra_keys == ((1, 5, req.mm_items[0].digest),)


def test_jsonl_requests_read_image_files(tmp_path: Path) -> None:
    synthetic_image(56, 84, 0).save(tmp_path / "a.png")
    lines = [
        {"prompt_ids": [5, 6], "images": ["a.png", "a.png"]},
        {"prompt_ids": [7], "images": [], "max_new_tokens": 3},
    ]
    path = tmp_path / "vl.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    w = cfg(f"workload.path={path}").workload
    first, second = vl_requests(w, tiny_model())
    assert [m.length for m in first.mm_items] == [6, 6]  # 4x6 patches -> 2x3 merged
    assert first.mm_items[0].digest == first.mm_items[1].digest
    assert first.prompt[-2:] == [5, 6] and second.prompt == [7] and second.max_new_tokens == 3
    path.write_text(json.dumps({"prompt_ids": [5], "images": ["missing.png"]}) + "\n")
    with pytest.raises(RecipeError, match="cannot read image"):
        vl_requests(w, tiny_model())


def test_encoder_metrics_split_ttft_by_seen_content() -> None:
    model = tiny_model()
    w = cfg(
        "workload.num_requests=4", "workload.image_size=[56,56]", "workload.repeat=1.0"
    ).workload
    reqs = vl_requests(w, model)  # one image four times: new, then seen three times
    stats = {"encoder_encode_s": 0.4, "encoder_cache_lookups": 4, "encoder_cache_hits": 3}
    out = _encoder_metrics(stats, reqs, [100.0, 10.0, 20.0, 30.0])
    assert out == {
        "encode_ms_per_item": 100.0,
        "encoder_cache_hit_pct": 75.0,
        "ttft_seen_ms": 20.0,
        "ttft_new_ms": 100.0,
    }


@pytest.mark.parametrize("cls", list(ARGS), ids=lambda c: c.__name__)
def test_args_round_trip_through_hf_config(cls) -> None:
    args = ARGS[cls]
    hf_cfg = getattr(transformers, cls.hf_class_name).config_class(**args.to_hf_config())
    assert cls.args_cls.from_hf_config(hf_cfg.to_dict()).to_hf_config() == args.to_hf_config()


def test_full_preset_has_published_dims() -> None:
    c = cfg("model.scale=full", "model.allow_random_full=true")
    args = preset_args(c.model, Qwen2VLForConditionalGeneration)
    assert (args.hidden_size, args.num_hidden_layers, args.vision["embed_dim"]) == (3584, 28, 1280)
    with pytest.raises(RecipeError, match="allow_random_full"):
        preset_args(cfg("model.scale=full").model, Qwen2VLForConditionalGeneration)


def test_published_flat_config_parses() -> None:
    """Qwen2-VL-2B-Instruct's config.json (abridged): decoder keys at the top level, M-RoPE
    in rope_scaling, tied embeddings."""
    published = {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
        "num_hidden_layers": 28, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": True, "image_token_id": 151655, "vision_start_token_id": 151652,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16,
                          "in_chans": 3, "hidden_size": 1536, "patch_size": 14,
                          "spatial_merge_size": 2, "temporal_patch_size": 2},
    }  # fmt: skip
    args = Qwen2VLForConditionalGeneration.args_cls.from_hf_config(published)
    assert args.tie_word_embeddings and args.image_token_id == 151655
    assert args.vision_end_token_id == 151653  # absent: transformers' default
    assert (args.rope_theta, args.mrope_section) == (1e6, [16, 24, 24])
    assert args.vision["embed_dim"] == 1280 and args.vision["hidden_size"] == 1536


def test_checkpoint_preprocessor_config_sets_the_image_processor(tmp_path: Path) -> None:
    from common.io.images import image_processor

    model = tiny_model()
    small = 56 * 56 * 4
    transformers.Qwen2VLImageProcessorPil(max_pixels=small).save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    proc = image_processor(model, str(tmp_path))
    grid = proc(images=[synthetic_image(448, 448, 0)], return_tensors="pt")["image_grid_thw"]
    assert int(grid.prod()) * 14 * 14 <= small  # the checkpoint's bound, not the default
    assert (
        image_processor(model, str(tmp_path), max_pixels=small * 4).size.longest_edge == small * 4
    )
