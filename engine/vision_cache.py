"""VisionCache: pictures decoded and encoded once, keyed by (image id, vision adapter), least-recently-used out."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch

from engine.images import ImageDecodeError, decode_image
from engine.model.vision import Picture, VisionLoRA, VisionTower
from engine.sequence import SeqImage, Sequence

logger = logging.getLogger(__name__)

CacheKey = tuple[str, str | None]  # (image id, adapter whose vision-tower LoRA encoded it, or None)


class VisionCache:
    """Preprocessed patches by image id, and encoder outputs by (image id, vision adapter), both LRU."""

    def __init__(self, tower: VisionTower, capacity: int) -> None:
        self.tower, self.capacity = tower, capacity
        self.pictures: OrderedDict[str, Picture] = OrderedDict()
        self.embeds: OrderedDict[CacheKey, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def picture(self, image_id: str, data: bytes | None) -> Picture:
        """Decode and preprocess a request picture once per id; ImageDecodeError for bytes that are no picture."""
        if image_id in self.pictures:
            self.pictures.move_to_end(image_id)
            return self.pictures[image_id]
        if data is None:
            raise ImageDecodeError(f"image {image_id} carries no bytes (resolve Redis keys before the engine)")
        picture = self.tower.preprocess(decode_image(data, image_id))
        self._put(self.pictures, image_id, picture)
        return picture

    def encode(self, seqs: Iterable[Sequence], vision_lora: Callable[[str | None], VisionLoRA | None]) -> None:
        """Fill in the embeddings of every picture of ``seqs`` still lacking them; records each one's vision time."""
        users: dict[CacheKey, list[tuple[Sequence, SeqImage]]] = {}
        lora_of: dict[CacheKey, VisionLoRA | None] = {}
        for seq in seqs:
            lora = vision_lora(seq.adapter)
            for image in seq.images:
                if image.embeds is None:
                    key = (image.image_id, lora.name if lora else None)
                    users.setdefault(key, []).append((seq, image))
                    lora_of[key] = lora
        found: dict[CacheKey, torch.Tensor] = {}
        for key, group in users.items():
            if key in self.embeds:
                found[key] = self.embeds[key]
                self.embeds.move_to_end(key)
            self.hits += len(group) - (key not in found)
            self.misses += key not in found
        by_lora: dict[str | None, list[CacheKey]] = {}
        for key in users:
            if key not in found:
                by_lora.setdefault(key[1], []).append(key)
        for keys in by_lora.values():
            start = time.time()
            outs = self.tower.encode([users[k][0][1].picture for k in keys], lora_of[keys[0]])
            elapsed = time.time() - start
            for key, emb in zip(keys, outs, strict=True):
                found[key] = emb
                self._put(self.embeds, key, emb)
            for seq in {id(s): s for k in keys for s, _ in users[k]}.values():
                seq.clock.vision_s += elapsed
        for key, group in users.items():
            for _, image in group:
                image.embeds = found[key]

    def stats(self) -> dict[str, int]:
        return {"vision_cache_entries": len(self.embeds), "vision_cache_hits": self.hits,
                "vision_cache_misses": self.misses, "images_encoded": self.tower.images_encoded}

    def _put(self, store: OrderedDict, key, value) -> None:
        if self.capacity <= 0:
            return
        store[key] = value
        store.move_to_end(key)
        while len(store) > self.capacity:
            store.popitem(last=False)
