"""RequestIntake: validates an EngineRequest and turns it into a Sequence (prompt ids, pictures, positions)."""

from __future__ import annotations

import numpy as np

from engine.base import TokenCallback
from engine.heads import TaskHead
from engine.lora.manager import LoRAManager
from engine.model.rope import mrope_positions
from engine.model.spec import ModelSpec
from engine.prompt import PromptBuilder, PromptTooLongError
from engine.request import EngineRequest
from engine.sequence import SeqImage, Sequence
from engine.vision_cache import VisionCache


class RequestIntake:
    """Everything about a request that can be checked before it queues; raises ValueError subclasses."""

    def __init__(self, spec: ModelSpec, tokenizer, lora: LoRAManager, vision: VisionCache | None,
                 heads: dict[str, TaskHead], max_model_len: int, kv_capacity_tokens: int,
                 max_chunk_tokens: int) -> None:
        self.spec, self.lora, self.vision, self.heads = spec, lora, vision, heads
        self.prompts = PromptBuilder(tokenizer, spec.spatial_merge_size)
        self.max_len = min(max_model_len, spec.max_position_embeddings, kv_capacity_tokens)
        self.max_chunk = max_chunk_tokens

    def make(self, request: EngineRequest, on_token: TokenCallback | None) -> Sequence:
        head = self._head(request.head)
        adapter = request.adapter or (head.adapter if head is not None else None)
        if adapter is not None:
            self.lora.spec(adapter)  # AdapterError for an unknown or malformed adapter
        if request.images and self.vision is None:
            raise ValueError(f"model {self.spec.model_type} has no vision tower; the request carries images")
        images = [SeqImage(img.id, self.vision.picture(img.id, img.jpeg)) for img in request.images]
        grids = [img.picture.grid for img in images]
        ids = self.prompts.build(request.prompt, grids, max_len=self.max_len - (0 if head else 1))
        if head is not None and len(ids) < head.positions:
            raise PromptTooLongError(f"head {request.head!r} reads {head.positions} positions; "
                                     f"the prompt has {len(ids)} tokens")
        positions, delta = mrope_positions(ids, grids, self.spec.image_token_id, self.spec.spatial_merge_size)
        image_positions = np.flatnonzero(np.asarray(ids) == self.spec.image_token_id) if images else None
        return Sequence(
            request=request, prompt_ids=ids, positions=positions.numpy(), rope_delta=delta,
            max_tokens=0 if head else min(request.sampling.max_tokens, self.max_len - len(ids)),
            images=images, head=head, on_token=on_token,
            **({"image_positions": image_positions} if image_positions is not None else {}),
        )

    def _head(self, name: str | None) -> TaskHead | None:
        if name is None:
            return None
        if name not in self.heads:
            raise ValueError(f"unknown task head {name!r} (registered: {sorted(self.heads) or 'none'})")
        head = self.heads[name]
        if head.positions > self.max_chunk:
            raise ValueError(f"head {name!r} reads {head.positions} positions, more than one iteration's "
                             f"token budget ({self.max_chunk})")
        return head
