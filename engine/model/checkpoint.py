"""Checkpoint: a model's spec, tokenizer, image processor, stop tokens and safetensors weights (or a dummy)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.model.dummy_tokenizer import dummy_tokenizer, special_token_ids
from engine.model.spec import ModelSpec, load_spec

logger = logging.getLogger(__name__)


def load_checkpoint_parts(path: str):
    """(config-checked model dir, tokenizer, image processor) of a Hugging Face checkpoint directory."""
    from transformers import AutoImageProcessor, AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no model checkpoint at {folder} (config.json missing)")
    return folder, AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return sorted({folder / name for name in weight_map.values()})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    return files


class Checkpoint:
    """A Hugging Face checkpoint directory, or ``dummy:<preset|config.json>`` for random weights."""

    def __init__(self, model: str) -> None:
        self.name = model
        self.is_dummy = model.startswith("dummy:")
        spec = load_spec(model)
        if self.is_dummy:
            self.folder = None
            self.tokenizer = dummy_tokenizer()
            spec = spec.with_token_ids(special_token_ids(self.tokenizer))
            self.image_processor = self._default_image_processor() if spec.has_vision else None
        else:
            self.folder = Path(model)
            self.tokenizer, self.image_processor = self._read_processors(self.folder, spec)
        self.spec: ModelSpec = spec
        self.eos_ids = self._eos_ids()

    @staticmethod
    def _read_processors(folder: Path, spec: ModelSpec):
        from transformers import AutoImageProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        processor = AutoImageProcessor.from_pretrained(folder) if spec.has_vision else None
        return tokenizer, processor

    @staticmethod
    def _default_image_processor():
        from transformers import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)

    def _eos_ids(self) -> list[int]:
        """Stop tokens: generation_config.json's eos ids when present, else the chat turn end."""
        ids: list[int] = []
        gen = self.folder / "generation_config.json" if self.folder else None
        if gen is not None and gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids = [eos] if isinstance(eos, int) else list(eos or [])
        if not ids:
            ids = [self.tokenizer.convert_tokens_to_ids("<|im_end|>")]
        return [int(i) for i in ids]

    def tensors(self, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
        """Every (name, tensor) of the checkpoint's safetensors files, read straight onto ``device``."""
        from safetensors import safe_open

        if self.folder is None:
            raise ValueError("a dummy checkpoint has no weight files")
        for path in _weight_files(self.folder):
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f.get_tensor(name)
