"""The `hf` backend: transformers + peft, one request at a time. The reference the `valora` backend is held to."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

from engine.adapter_store import AdapterError, AdapterStore
from engine.base import EngineBackend, TokenCallback, error_result, register_backend
from engine.config import EngineConfig
from engine.images import ImageDecodeError, decode_image
from engine.prompt import PromptBuilder
from engine.request import EngineRequest, EngineResult, Timings

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_checkpoint_parts(path: str):
    """(config-checked model dir, tokenizer, image processor) of a Hugging Face checkpoint directory."""
    from transformers import AutoImageProcessor, AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no model checkpoint at {folder} (config.json missing)")
    return folder, AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)


@register_backend("hf")
class HFEngine(EngineBackend):
    """Serves requests with transformers' Qwen2.5-VL and peft's LoRA layers; no batching."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.engine_id = config.engine_id or f"{socket.gethostname()}:{os.getpid()}"
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self._load_model()
        self.store = AdapterStore(config.adapters)
        self.loaded_adapters: set[str] = set()
        self.queue: deque[tuple[EngineRequest, TokenCallback | None, float]] = deque()

    def _load_model(self) -> None:
        from transformers import Qwen2_5_VLForConditionalGeneration

        folder, self.tokenizer, self.image_processor = load_checkpoint_parts(self.config.model)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.prompts = PromptBuilder(self.tokenizer, self.model.config.vision_config.spatial_merge_size)
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.max_len = min(self.config.max_model_len, self.model.config.text_config.max_position_embeddings)

    def add_request(self, request: EngineRequest, on_token: TokenCallback | None = None) -> None:
        self.queue.append((request, on_token, time.time()))

    def has_unfinished(self) -> bool:
        return bool(self.queue)

    def health(self) -> dict[str, Any]:
        return {"ready": True, "backend": "hf", "engine_id": self.engine_id, "mode": "unmerged",
                "adapters_loaded": sorted(self.loaded_adapters), "queued": len(self.queue)}

    def step(self) -> list[EngineResult]:
        if not self.queue:
            return []
        request, on_token, arrived = self.queue.popleft()
        try:
            result = self._serve(request, arrived)
        except (AdapterError, ImageDecodeError, ValueError) as exc:
            return [error_result(request, str(exc), self.engine_id)]
        if on_token is not None and result.text:
            on_token(request.request_id, result.text)
        return [result]

    def _peft_model(self, adapter: str | None):
        """The model with ``adapter`` active (loading it on first use); None disables adapters."""
        if adapter is None:
            return self.model
        spec = self.store.get(adapter)
        if adapter not in self.loaded_adapters:
            from peft import PeftModel

            try:
                if not self.loaded_adapters:
                    self.model = PeftModel.from_pretrained(self.model, spec.path, adapter_name=adapter)
                else:
                    self.model.load_adapter(spec.path, adapter_name=adapter)
            except (RuntimeError, ValueError, KeyError, OSError) as exc:
                raise AdapterError(f"adapter {adapter!r} does not load onto this model: {exc}") from None
            self.model.eval()
            self.loaded_adapters.add(adapter)
        self.model.set_adapter(adapter)
        return self.model

    def _serve(self, request: EngineRequest, arrived: float) -> EngineResult:
        start = time.time()
        timings = Timings(queue_ms=(start - arrived) * 1000.0)
        model = self._peft_model(request.adapter)
        pictures = [decode_image(img.jpeg or b"", img.id) for img in request.images]
        inputs: dict[str, torch.Tensor] = {}
        grids: list[list[int]] = []
        if pictures:
            processed = self.image_processor(images=pictures, return_tensors="pt")
            inputs["pixel_values"] = processed["pixel_values"].to(self.device, self.dtype)
            inputs["image_grid_thw"] = processed["image_grid_thw"].to(self.device)
            grids = processed["image_grid_thw"].tolist()
        ids = self.prompts.build(request.prompt, grids, max_len=self.max_len - 1)
        input_ids = torch.tensor([ids], device=self.device)
        t_vision = time.time()
        timings.vision_ms = (t_vision - start) * 1000.0
        # A base-model request on a peft-wrapped model runs with every adapter disabled.
        base_only = request.adapter is None and bool(self.loaded_adapters)
        with torch.no_grad(), (self.model.disable_adapter() if base_only else contextlib.nullcontext()):
            if request.head is not None:
                text, head_output, n_out, finish = "", self._run_head(model, request.head, input_ids, inputs), 0, "head"
                timings.prefill_ms = (time.time() - t_vision) * 1000.0
            else:
                text, n_out, finish, timings.prefill_ms, timings.decode_ms = self._decode(
                    model, request, input_ids, inputs)
                head_output = None
        timings.e2e_ms = (time.time() - request.created_at) * 1000.0
        return EngineResult(
            request_id=request.request_id, text=text, head_output=head_output, prompt_tokens=len(ids),
            output_tokens=n_out, finish_reason=finish, mode="unmerged", adapter=request.adapter,
            engine_id=self.engine_id, timings=timings, meta=request.meta,
        )

    def _run_head(self, model, name: str, input_ids, inputs) -> dict[str, Any]:
        head = self.heads.get(name)
        if head is None:
            raise ValueError(f"unknown task head {name!r} (registered: {sorted(self.heads) or 'none'})")
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), output_hidden_states=True,
                    **inputs)
        hidden = out.hidden_states[-1][0, -head.positions:]  # [positions, hidden]
        return head.answer(hidden)

    def _decode(self, model, request: EngineRequest, input_ids, inputs):
        sp = request.sampling
        budget = min(sp.max_tokens, self.max_len - input_ids.shape[1])
        if budget <= 0:
            return "", 0, "length", 0.0, 0.0
        gen_kwargs: dict[str, Any] = {"max_new_tokens": budget, "eos_token_id": self.eos_id,
                                      "pad_token_id": self.tokenizer.pad_token_id}
        if sp.temperature > 0:
            if sp.seed is not None:
                torch.manual_seed(sp.seed)
            gen_kwargs.update(do_sample=True, temperature=sp.temperature, top_p=sp.top_p)
        else:
            gen_kwargs.update(do_sample=False)
        t0 = time.time()
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **inputs, **gen_kwargs)
        elapsed = (time.time() - t0) * 1000.0
        new = out[0, input_ids.shape[1]:].tolist()
        finish = "length"
        if self.eos_id in new:
            new = new[: new.index(self.eos_id)]
            finish = "eos"
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        for stop in sp.stop:
            cut = text.find(stop)
            if stop and cut >= 0:
                text, finish = text[:cut], "stop"
        # generate() does not split prefill from decode; attribute one token's share to prefill.
        per_token = elapsed / max(1, len(new) + 1)
        return text, len(new), finish, per_token, elapsed - per_token
