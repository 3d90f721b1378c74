"""ModelSpec: the language model's dimensions and special tokens, read from a Hugging Face config (or a preset)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The published Qwen2.5-VL configs (the parts our runner and transformers' vision tower read).
_VISION_7B = {
    "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
    "in_channels": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2,
}
_TOKENS = {"bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
           "vision_end_token_id": 151653, "image_token_id": 151655, "video_token_id": 151656}
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-7b": {
        "model_type": "qwen2_5_vl", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 128000, "vocab_size": 152064, "tie_word_embeddings": False,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vision_config": _VISION_7B, **_TOKENS,
    },
    "qwen2.5-vl-3b": {
        "model_type": "qwen2_5_vl", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
        "num_attention_heads": 16, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 128000, "vocab_size": 151936, "tie_word_embeddings": True,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {**_VISION_7B, "out_hidden_size": 2048}, **_TOKENS,
    },
}


@dataclass(frozen=True)
class ModelSpec:
    """What the runner needs to build the decoder; ``raw`` keeps the whole config for the vision tower."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    tie_word_embeddings: bool
    max_position_embeddings: int
    image_token_id: int | None
    spatial_merge_size: int
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def has_vision(self) -> bool:
        return self.model_type in ("qwen2_5_vl", "qwen2_vl") and "vision_config" in self.raw

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def with_token_ids(self, ids: dict[str, int]) -> ModelSpec:
        """The same architecture with special-token ids replaced (dummy models use the dummy tokenizer's)."""
        raw = {**copy.deepcopy(self.raw), **ids}
        return parse_config(raw)


def _rope(text: dict[str, Any], head_dim: int) -> tuple[float, tuple[int, int, int]]:
    """(theta, mrope_section) from either the 4.x ``rope_scaling`` or the 5.x ``rope_parameters`` layout."""
    params = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", text.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", scaling.get("rope_type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"rope type {rope_type!r} is not supported (only default / mrope)")
    section = params.get("mrope_section") or scaling.get("mrope_section")
    if section is None:  # plain Qwen2: one 1-D position for every frequency
        section = [head_dim // 2, 0, 0]
    if len(section) != 3 or sum(section) * 2 != head_dim:
        raise ValueError(f"mrope_section {section} must have 3 parts summing to head_dim/2 = {head_dim // 2}")
    return theta, (int(section[0]), int(section[1]), int(section[2]))


def parse_config(cfg: dict[str, Any]) -> ModelSpec:
    """A ModelSpec from a Qwen2 / Qwen2-VL / Qwen2.5-VL config.json (flat 4.x or nested 5.x ``text_config``)."""
    model_type = cfg.get("model_type", "")
    if model_type not in ("qwen2", "qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"model_type {model_type!r} is not a Qwen2 / Qwen2.5-VL model")
    text = {**cfg, **(cfg.get("text_config") or {})}
    heads = int(text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or text["hidden_size"] // heads)
    theta, section = _rope(text, head_dim)
    tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    vision = cfg.get("vision_config") or {}
    return ModelSpec(
        model_type=model_type,
        vocab_size=int(text["vocab_size"]),
        hidden_size=int(text["hidden_size"]),
        intermediate_size=int(text["intermediate_size"]),
        num_layers=int(text["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        mrope_section=section,
        tie_word_embeddings=bool(tie),
        max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
        image_token_id=cfg.get("image_token_id"),
        spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
        raw=cfg,
    )


def load_spec(model: str) -> ModelSpec:
    """The spec of a checkpoint dir, 'dummy:<preset>' or 'dummy:/path/config.json'."""
    if model.startswith("dummy:"):
        target = model.removeprefix("dummy:")
        if target in PRESETS:
            return parse_config(copy.deepcopy(PRESETS[target]))
        path = Path(target)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"dummy model {target!r}: not a preset ({sorted(PRESETS)}) nor a config.json")
        return parse_config(json.loads(path.read_text()))
    path = Path(model) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no model checkpoint at {model} (config.json missing)")
    return parse_config(json.loads(path.read_text()))
