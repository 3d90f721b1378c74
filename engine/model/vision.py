"""VisionTower: transformers' Qwen2.5-VL vision encoder and merger, run by a sync-free forward, CUDA-graphed on GPU.

transformers' own forward reads its window boundaries back from the device in every block and runs one attention
call per window (hundreds per encode): an encode of one 224 px picture costs ~60 ms of host time for a few ms of
kernels (H200). Here the weights stay in transformers' module (the checkpoint loads into it, vision LoRA hooks its
linears), but the forward is ours: every index (rotary positions, window order and its inverse, the runs that
attend among themselves) is built on the host from the pictures' grids, and each block attends over all its
windows (or frames) in one padded, masked attention call. On CUDA the whole encode is captured as a graph per
(grids, vision LoRA) and replayed.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine.device import capture_graph
from engine.model.spec import ModelSpec

logger = logging.getLogger(__name__)

Grids = tuple[tuple[int, int, int], ...]  # each picture's (t, h, w) patch grid, in encode order


@dataclass(frozen=True)
class VisionLoRA:
    """One adapter's updates to vision-tower linears: module path -> (A [r, in], B [out, r], scale)."""

    name: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]


@dataclass(frozen=True)
class Picture:
    """A preprocessed picture: patches ready for the encoder and its (t, h, w) patch grid."""

    pixel_values: torch.Tensor  # [patches, channels * temporal_patch * patch * patch] on CPU, tower dtype
    grid: tuple[int, int, int]
    num_tokens: int  # merged tokens it becomes in the language model (merge x merge patches each)


@dataclass(frozen=True)
class Runs:
    """Runs of the window-ordered sequence that attend only among themselves, laid out as one padded batch.

    Slot ``r * width + j`` holds row ``j`` of run ``r``; slots past a run's end repeat row 0 and are masked out as
    keys (their query outputs are dropped).
    """

    num: int
    width: int  # the longest run
    cos: torch.Tensor  # [num * width, head_dim] rotary cos of each slot (fp32)
    sin: torch.Tensor  # [num * width, head_dim]
    gather: torch.Tensor | None  # [num * width] sequence row of each slot; None when every run is `width` long
    scatter: torch.Tensor | None  # [seq] slot of each sequence row
    mask: torch.Tensor | None  # [num, 1, 1, width] bool, True on a run's real keys

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[seq, ...] -> [num * width, ...]."""
        return x if self.gather is None else x.index_select(0, self.gather)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[num * width, ...] -> [seq, ...]."""
        return x if self.scatter is None else x.index_select(0, self.scatter)


@dataclass(frozen=True)
class EncodePlan:
    """Everything an encode of one grid tuple needs besides its pixels, on the device; built once per tuple."""

    order: torch.Tensor  # [seq] patch row (picture order) of each window-ordered row
    restore: torch.Tensor  # [merged] window-ordered merged row of each merged token, in picture order
    windows: Runs  # for the window-attention blocks
    frames: Runs  # for the full-attention blocks: each frame of each picture


@dataclass(frozen=True)
class HostLayout:
    """The host-side indices an EncodePlan is made of (numpy, int64)."""

    order: np.ndarray  # [seq]
    restore: np.ndarray  # [merged]
    positions: np.ndarray  # [seq, 2] (row, column) patch position of each window-ordered row
    window_lengths: list[int]
    frame_lengths: list[int]


def host_layout(grids: Grids, merge: int, window: int) -> HostLayout:
    """Window order as transformers builds it: per frame, ``window x window`` merged units, row-major windows.

    ``window`` is in merged units (config ``window_size // spatial_merge_size // patch_size``); a picture's
    patches arrive merge-block-major (the processor's layout), ``merge * merge`` consecutive patches per unit.
    """
    unit = merge * merge
    units, window_lengths, frame_lengths, positions = [], [], [], []
    first = 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blocks = (gh, merge, gw, merge)
        pos = np.stack([a.reshape(blocks).transpose(0, 2, 1, 3).ravel() for a in (rows, cols)], axis=-1)
        positions.append(np.tile(pos, (t, 1)))
        for frame in np.arange(first, first + t * gh * gw).reshape(t, gh, gw):
            for r in range(0, gh, window):
                for c in range(0, gw, window):
                    win = frame[r:r + window, c:c + window].ravel()
                    units.append(win)
                    window_lengths.append(win.size * unit)
        frame_lengths += [h * w] * t
        first += t * gh * gw
    unit_order = np.concatenate(units)
    order = (unit_order[:, None] * unit + np.arange(unit)).ravel()
    return HostLayout(order, np.argsort(unit_order), np.concatenate(positions)[order], window_lengths, frame_lengths)


def padded_runs(lengths: list[int], cos: torch.Tensor, sin: torch.Tensor) -> Runs:
    """Runs of ``lengths`` rows (in sequence order) as one padded batch; cos, sin: [seq, head_dim] on the device."""
    width = max(lengths)
    if all(n == width for n in lengths):
        return Runs(len(lengths), width, cos, sin, None, None, None)
    starts = np.cumsum([0, *lengths[:-1]])
    real = np.arange(width)[None, :] < np.asarray(lengths)[:, None]  # [runs, width]
    to_device = lambda a: torch.from_numpy(a).to(cos.device)
    gather = to_device(np.where(real, starts[:, None] + np.arange(width), 0).ravel())
    scatter = to_device(np.flatnonzero(real.ravel()))
    return Runs(len(lengths), width, cos.index_select(0, gather), sin.index_select(0, gather), gather, scatter,
                to_device(real[:, None, None, :]))


@dataclass(frozen=True)
class VisionGraph:
    """One captured encode: replay it after copying the pixels into ``pixels``; read ``out`` before the next."""

    graph: torch.cuda.CUDAGraph
    pixels: torch.Tensor  # [patches, patch_dim] static input, in the tower's dtype
    out: torch.Tensor  # [merged tokens, lm_hidden], overwritten by every replay
    plan: EncodePlan  # keeps the index tensors the graph reads alive
    lora: VisionLoRA | None  # keeps the adapter tensors the graph reads alive


class VisionTower:
    """Encodes pictures into language-model embeddings; counts how many it has encoded (cache tests use it)."""

    MAX_GRAPHS = 16  # captured (grids, LoRA) keys kept, least-recently-used out
    MAX_PLANS = 64

    def __init__(self, spec: ModelSpec, image_processor, device: torch.device, dtype: torch.dtype,
                 cuda_graphs: bool = True) -> None:
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel,
            apply_rotary_pos_emb_vision,
        )

        if spec.model_type != "qwen2_5_vl":
            raise ValueError(f"vision tower of model_type {spec.model_type!r} is not supported (qwen2_5_vl only)")
        config = Qwen2_5_VLVisionConfig(**spec.raw["vision_config"])
        config._attn_implementation = "sdpa"
        with torch.device(device):
            self.module = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, dtype=dtype).eval()
        self.rotary = apply_rotary_pos_emb_vision  # transformers' own, so our rotation is theirs
        self.processor = image_processor
        self.merge = config.spatial_merge_size
        self.window = config.window_size // config.spatial_merge_size // config.patch_size
        self.full_blocks = frozenset(config.fullatt_block_indexes)
        self.device, self.dtype = device, dtype
        self.images_encoded = 0
        self.plans: OrderedDict[Grids, EncodePlan] = OrderedDict()
        self.use_graphs = cuda_graphs and device.type == "cuda"
        self.graphs: OrderedDict[tuple[Grids, str | None], VisionGraph] = OrderedDict()
        self.pool = None  # one CUDA memory pool shared by the graphs, made at the first capture

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.module.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(f"vision weights do not fit the tower: missing {missing[:3]}, unexpected {unexpected[:3]}")

    def preprocess(self, image: np.ndarray) -> Picture:
        """RGB [height, width, 3] -> patches and grid, resized the way the checkpoint's processor says.

        The patches are kept in the tower's dtype (what the encode casts them to anyway): half the host memory of
        the vision cache's pictures, and half the upload, in bf16."""
        out = self.processor(images=[image], return_tensors="pt")
        t, h, w = (int(v) for v in out["image_grid_thw"][0].tolist())
        return Picture(out["pixel_values"].to(self.dtype), (t, h, w), t * h * w // (self.merge * self.merge))

    @torch.inference_mode()  # as the engine's iterations run: a graph's static buffers are inference tensors
    def encode(self, pictures: list[Picture], lora: VisionLoRA | None = None) -> list[torch.Tensor]:
        """Pictures -> one [tokens, lm_hidden] embedding per picture, in one encoder call (or graph replay)."""
        pixels = torch.cat([p.pixel_values for p in pictures])  # [patches, patch_dim] on CPU
        grids = tuple(p.grid for p in pictures)
        plan = self.plan(grids)
        merged = self._replay(grids, plan, pixels, lora) if self.use_graphs else None
        if merged is None:
            with self._lora_hooks(lora):
                merged = self.forward(pixels.to(self.device, self.dtype), plan)  # [sum tokens, lm_hidden]
        self.images_encoded += len(pictures)
        return list(merged.split([p.num_tokens for p in pictures]))

    def plan(self, grids: Grids) -> EncodePlan:
        """The device indices of ``grids``, built on the host (no device reads) and kept for the next encode."""
        if grids in self.plans:
            self.plans.move_to_end(grids)
            return self.plans[grids]
        layout = host_layout(grids, self.merge, self.window)

        to_device = lambda a: torch.from_numpy(a).to(self.device)
        # Rotary angles as transformers computes them: [h freqs, w freqs] twice, in fp32.
        inv_freq = self.module.rotary_pos_emb.inv_freq.to(self.device, torch.float32)
        freqs = (to_device(layout.positions)[..., None].float() * inv_freq).flatten(1)  # [seq, head_dim / 2]
        angles = torch.cat([freqs, freqs], dim=-1)  # [seq, head_dim]
        cos, sin = angles.cos(), angles.sin()
        plan = EncodePlan(to_device(layout.order), to_device(layout.restore),
                          padded_runs(layout.window_lengths, cos, sin), padded_runs(layout.frame_lengths, cos, sin))
        self.plans[grids] = plan
        while len(self.plans) > self.MAX_PLANS:
            self.plans.popitem(last=False)
        return plan

    def forward(self, pixels: torch.Tensor, plan: EncodePlan) -> torch.Tensor:
        """transformers' encoder forward over its submodules, without host syncs.

        pixels: [patches, patch_dim] on the device, in the tower's dtype -> merged tokens [sum tokens, lm_hidden].
        """
        m = self.module
        x = m.patch_embed(pixels).index_select(0, plan.order)  # x: [seq, hidden], window order
        for i, block in enumerate(m.blocks):
            runs = plan.frames if i in self.full_blocks else plan.windows
            x = x + self._attention(block.attn, block.norm1(x), runs)
            x = x + block.mlp(block.norm2(x))
        return m.merger(x).index_select(0, plan.restore)  # [merged, lm_hidden], picture order

    def _attention(self, attn, x: torch.Tensor, runs: Runs) -> torch.Tensor:
        """Every run's attention in one call: x [seq, hidden] -> [seq, hidden]."""
        heads = attn.num_heads
        qkv = runs.pad(attn.qkv(x)).reshape(runs.num * runs.width, 3, heads, -1)  # [slots, 3, heads, head_dim]
        q, k, v = qkv.unbind(1)
        q, k = self.rotary(q, k, runs.cos, runs.sin)
        q, k, v = (t.reshape(runs.num, runs.width, heads, -1).transpose(1, 2) for t in (q, k, v))  # [runs, heads, ...]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=runs.mask, scale=attn.scaling)
        out = out.transpose(1, 2).reshape(runs.num * runs.width, -1)  # [slots, hidden]
        return attn.proj(runs.unpad(out))

    def _replay(self, grids: Grids, plan: EncodePlan, pixels: torch.Tensor,
                lora: VisionLoRA | None) -> torch.Tensor | None:
        """The encode as a CUDA graph replay (captured on first use); None when capture fails (eager from then)."""
        key = (grids, lora.name if lora else None)
        graph = self.graphs.get(key)
        if graph is not None and graph.lora is not lora:  # the adapter was reloaded: its tensors moved
            del self.graphs[key]
            graph = None
        if graph is None:
            try:
                graph = self._capture(plan, pixels, lora)
            except RuntimeError as err:
                logger.warning("vision-tower CUDA graph capture failed (%s); encoding eagerly from now on", err)
                self.use_graphs = False
                self.graphs.clear()
                return None
            self.graphs[key] = graph
            while len(self.graphs) > self.MAX_GRAPHS:
                self.graphs.popitem(last=False)
        else:
            graph.pixels.copy_(pixels)
            self.graphs.move_to_end(key)
        graph.graph.replay()
        return graph.out.clone()  # the next replay of any vision graph may overwrite `out`; callers cache this

    def _capture(self, plan: EncodePlan, pixels: torch.Tensor, lora: VisionLoRA | None) -> VisionGraph:
        logger.info("capturing a vision-tower graph for %d patches", pixels.shape[0])
        static = pixels.to(self.device, self.dtype)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with self._lora_hooks(lora):
            graph, out = capture_graph(lambda: self.forward(static, plan), self.device, self.pool)
        return VisionGraph(graph, static, out, plan, lora)

    @contextlib.contextmanager
    def _lora_hooks(self, lora: VisionLoRA | None) -> Iterator[None]:
        """Adds ``scale · (x Aᵀ) Bᵀ`` to each adapted vision linear for the duration of one encode."""
        handles = []
        if lora is not None:
            for path, (a, b, scale) in lora.modules.items():
                module = self.module.get_submodule(path)

                def hook(_mod, args, y, a=a, b=b, scale=scale):
                    return y + scale * ((args[0] @ a.t()) @ b.t())

                handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

