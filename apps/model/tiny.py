"""Tiny Qwen2.5-VL-architecture models and their byte-level BPE tokenizer, saved as Hugging Face checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from engine.model.dummy_tokenizer import CHAT_TEMPLATE
from engine.model.dummy_tokenizer import SPECIAL_TOKENS as QWEN_SPECIAL_TOKENS

logger = logging.getLogger(__name__)

# Qwen2-VL's special tokens, in this order, so ids 0..6 are fixed across our tokenizers.
SPECIAL_TOKENS = list(QWEN_SPECIAL_TOKENS)

# Query positions for task heads (a DETR-style box head reads one hidden state per query). Distinct tokens keep
# distinct embeddings, which is what tells the queries apart; the base model never sees them in pretraining.
QUERY_TOKENS = [f"<|query_{i}|>" for i in range(16)]

# Architecture presets. head_dim / 2 must equal sum(mrope_section).
PRESETS: dict[str, dict[str, Any]] = {
    "test": {
        "vision": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56,
                       fullatt_block_indexes=[1]),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, mrope_section=[2, 3, 3]),
        "pixels": (56 * 56, 112 * 112),
    },
    # About 11M parameters: serves on a 2-core CPU (a 224 px frame becomes 168 px = 36 image tokens) and fits, in
    # fp16 with its adapters, the 40 MB the project ships.
    "demo": {
        "vision": dict(depth=4, hidden_size=192, intermediate_size=512, num_heads=3, window_size=112,
                       fullatt_block_indexes=[1, 3]),
        "text": dict(hidden_size=384, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6,
                     num_key_value_heads=2, mrope_section=[8, 12, 12]),
        "pixels": (112 * 112, 168 * 168),
    },
}


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 1024, extra_special: list[str] | None = None):
    """Train a byte-level BPE tokenizer (any text encodes) with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = SPECIAL_TOKENS + list(extra_special or [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=special[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(preset: str, vocab_size: int):
    """A Qwen2_5_VLConfig for a preset, with our tokenizer's special-token ids."""
    from transformers import Qwen2_5_VLConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
    spec = PRESETS[preset]
    text = dict(spec["text"])
    mrope = text.pop("mrope_section")
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    if sum(mrope) * 2 != head_dim:
        raise ValueError(f"preset {preset}: mrope_section {mrope} must sum to head_dim/2 = {head_dim // 2}")
    ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    return Qwen2_5_VLConfig(
        vision_config=dict(spec["vision"], out_hidden_size=text["hidden_size"], patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(text, vocab_size=vocab_size, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": mrope}, rope_theta=10000.0,
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )


def image_processor(preset: str):
    """The Qwen2-VL image processor sized for a preset."""
    from transformers import Qwen2VLImageProcessor

    min_pixels, max_pixels = PRESETS[preset]["pixels"]
    return Qwen2VLImageProcessor(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, merge_size=2, temporal_patch_size=2
    )


def build_model(preset: str, tokenizer, seed: int = 0):
    """A randomly initialised Qwen2_5_VLForConditionalGeneration for a preset, in fp32."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = tiny_config(preset, vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    return model.float().eval()


def save_checkpoint(out_dir: str | Path, model, tokenizer, processor) -> Path:
    """Write config.json, model.safetensors, tokenizer and preprocessor files to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    logger.info("saved checkpoint to %s (%.1fM parameters)", out, sum(p.numel() for p in model.parameters()) / 1e6)
    return out


# The language model's linears (the vision tower has gate/up/down projections too, hence the anchor).
LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lm_target_regex(targets: Iterable[str] = LM_TARGETS) -> str:
    """A PEFT target_modules regex matching only the language model's projections."""
    return r".*language_model.*\.(" + "|".join(targets) + r")$"


def save_random_adapter(model, out_dir: str | Path, rank: int, alpha: float | None = None, seed: int = 0,
                        targets: Iterable[str] = LM_TARGETS, use_rslora: bool = False, std: float = 0.05) -> Path:
    """Save a PEFT LoRA adapter with random A and B (nonzero, so it changes outputs) for ``model``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, use_rslora=use_rslora,
                        target_modules=lm_target_regex(targets), init_lora_weights=False)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, std)
    out = Path(out_dir)
    peft_model.save_pretrained(out)
    peft_model.unload()  # leaves ``model`` without LoRA layers for the next adapter
    return out


def small_base(out_dir: str | Path, preset: str = "test", vocab_size: int = 512, seed: int = 0,
               frames: int = 200) -> Path:
    """A randomly initialised base checkpoint with the domain tokenizer (query tokens included), for tests."""
    from apps.model.corpus import tokenizer_corpus

    tokenizer = train_tokenizer(tokenizer_corpus(frames), vocab_size, QUERY_TOKENS)
    model = build_model(preset, tokenizer, seed=seed)
    return save_checkpoint(out_dir, model, tokenizer, image_processor(preset))
