"""PrefillGraphs: prefill (and mixed) iterations as piecewise CUDA graphs, the attentions run eagerly in between.

An eager forward of a 7B costs its host ~30 ms, and ~40 ms more with multi-LoRA rows (two Triton launches per
projection and layer), where the device needs a few milliseconds for a few hundred rows (H200, bench/RESULTS.md).
Attention is the only op that mixes rows (each sequence's queries over its own cached context), so the layers are
cut around it, as vLLM's piecewise graphs are: piece i runs layer i-1 after its attention (o projection, norm,
MLP) and layer i up to its attention (norm, q/k/v, RoPE, the cache write); the last piece ends with the final
norm. Each piece runs on a padded row count (the bucket) and is captured once per (bucket, LoRA terms, backend);
the attentions run on the real rows between the replays. Padded rows write their keys into the scratch block 0
and are dropped. Pieces exchange rows through static buffers, shared by every bucket.

Without CUDA (``capture=False``) the same pieces run directly: the CPU tests check the padded, piecewise forward
against the plain one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from engine.attention import AttentionMetadata
from engine.device import capture_graph
from engine.forward_context import ForwardContext
from engine.lora.batch import MultiLoRADelta, StaticLoRABatch
from engine.model.qwen2 import Qwen2LM
from engine.model_input import HostStaging, ModelInput
from engine.moe.adapters import AdapterManager
from engine.moe.manager import MoEPlan

logger = logging.getLogger(__name__)


def prefill_buckets(max_tokens: int) -> list[int]:
    """Row counts that get graphs: powers of two from 16 to 256, then every 128, up to ``max_tokens``."""
    sizes = [b for b in (16, 32, 64, 128, 256) if b < max_tokens] + list(range(384, max_tokens, 128))
    return sorted(set(sizes + [max_tokens]))


class PrefillGraphs:
    """Static buffers for ``max_tokens`` rows; one list of piece graphs per (backend, bucket, LoRA terms)."""

    def __init__(self, model: Qwen2LM, lora: AdapterManager, max_tokens: int, max_seqs: int, device: torch.device,
                 use_triton: bool, capture_graphs: bool = True) -> None:
        self.model, self.lora, self.device = model, lora, device
        self.use_triton, self.capture_graphs = use_triton, capture_graphs and device.type == "cuda"
        self.sizes = prefill_buckets(max_tokens)
        self.max_seqs = max_seqs
        spec, n = model.spec, self.sizes[-1]
        dtype = next(model.parameters()).dtype

        def buffer(*shape: int, kind: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=kind, device=device)

        self.x = buffer(n, spec.hidden_size)  # the layer-0 input: token (and picture) embeddings
        self.cos, self.sin = buffer(n, spec.head_dim), buffer(n, spec.head_dim)
        self.slot_mapping = buffer(n, kind=torch.long)
        self.q = buffer(n, spec.num_heads, spec.head_dim)  # a piece's queries, for the attention after it
        self.attn = buffer(n, spec.num_heads * spec.head_dim)  # that attention's output, for the next piece
        self.residual = buffer(n, spec.hidden_size)
        self.out = buffer(n, spec.hidden_size)  # final-norm hidden states
        self.static_lora: dict[tuple[int, int], StaticLoRABatch] = {}
        self.graphs: dict[tuple[str, int, int], list[Callable[[], None]]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture_graphs else None
        self.failed = False

    def can_run(self, num_tokens: int, terms: int, moe: MoEPlan) -> bool:
        safe = terms == 0 or self.lora.graph_safe or not self.capture_graphs  # torch's LoRA path reads the host
        return not self.failed and num_tokens <= self.sizes[-1] and moe.path == "none" and safe

    def run(self, inp: ModelInput, terms: int, staging: HostStaging | None = None) -> torch.Tensor | None:
        """Hidden states [T, hidden] of ``inp``'s rows (a view of a static buffer: read it before the next run);
        None if this bucket's capture failed (then every later iteration runs eagerly; the warning says why)."""
        rows = inp.num_tokens
        size = next(b for b in self.sizes if b >= rows)
        try:
            pieces = self.pieces(size, terms)
        except RuntimeError as err:  # e.g. out of memory for a pool, or an op that cannot be captured
            self._fail(err)
            return None
        self._load(inp, size)
        if terms:
            merged = self.lora.merge_state.slot if terms == 2 else None
            self._lora(size, terms).fill(inp.lora_rows, self.lora.pool, rows, merged,
                                         staging.upload if staging is not None else None)
            self.lora.pool.wait_ready()
        ctx = ForwardContext(inp.attn)
        for layer, piece in zip(self.model.layers, pieces, strict=False):
            piece()
            self.attn[:rows].copy_(layer.self_attn.attend(self.q[:rows], ctx))
        pieces[-1]()
        return self.out[:rows]

    def pieces(self, size: int, terms: int) -> list[Callable[[], None]]:
        """The bucket's pieces (graph replays on CUDA), made on first use; see ``capture_all``."""
        key = (getattr(self.lora.op, "name", ""), size, terms)
        if key not in self.graphs:
            self.graphs[key] = self._make(size, terms)
        return self.graphs[key]

    def capture_all(self, terms: tuple[int, ...] = (0, 1, 2)) -> int:
        """Capture every bucket's pieces for ``terms`` now (start-up), instead of in the first iteration of each;
        returns the number of graphs (0 if a capture failed: then prefill stays eager)."""
        terms = tuple(t for t in terms if t == 0 or self.lora.graph_safe)
        try:
            return sum(len(self.pieces(size, k)) for size in self.sizes for k in terms)
        except RuntimeError as err:
            self._fail(err)
            return 0

    def _fail(self, err: RuntimeError) -> None:
        logger.warning("prefill graph capture failed (%s); prefill iterations run eagerly from now on", err)
        self.failed = True

    def _lora(self, size: int, terms: int) -> StaticLoRABatch:
        if (size, terms) not in self.static_lora:
            # at most one segment per sequence, and mixture's segment of rows with no plain adapter
            self.static_lora[size, terms] = StaticLoRABatch(size, self.lora.layout.max_rank, self.device, terms,
                                                            segments=self.max_seqs + 1,
                                                            routed=size <= self.lora.fused_rows)
        return self.static_lora[size, terms]

    def _load(self, inp: ModelInput, size: int) -> None:
        rows, dtype = inp.num_tokens, self.x.dtype
        torch.index_select(self.model.embed_tokens.weight, 0, inp.input_ids, out=self.x[:rows])
        if inp.image_rows is not None:
            self.x.index_copy_(0, inp.image_rows, inp.image_embeds.to(dtype))
        cos, sin = self.model.rotary(inp.positions, dtype)
        self.cos[:rows].copy_(cos)
        self.sin[:rows].copy_(sin)
        self.slot_mapping[:rows].copy_(inp.attn.slot_mapping)
        self.slot_mapping[rows:size].zero_()  # padding rows: the scratch block

    def _make(self, size: int, terms: int) -> list[Callable[[], None]]:
        layers = self.model.layers
        attn = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], block_tables=self.slot_mapping.new_zeros(0, 1, dtype=torch.int32),
            cu_query_lens=self.slot_mapping.new_zeros(1, dtype=torch.int32),
            context_lens=self.slot_mapping.new_zeros(0, dtype=torch.int32), max_query_len=0, query_lens_host=[],
            context_lens_host=[], use_triton=self.use_triton)
        static = self._lora(size, terms) if terms else None
        deltas = [MultiLoRADelta(self.lora.pool, self.lora.op, static.batch, static.routing)] if static else []
        ctx = ForwardContext(attn, deltas)
        cos, sin = self.cos[:size], self.sin[:size]

        def piece(i: int) -> None:
            """Layer i-1 after its attention, then layer i up to its attention (or the final norm)."""
            if i == 0:
                h, residual = self.x[:size], None
            else:
                h, residual = layers[i - 1].post_attention(self.attn[:size], self.residual[:size], ctx)
            if i == len(layers):
                self.out[:size].copy_(self.model.norm(h, residual)[0])
                return
            q, residual = layers[i].pre_attention(h, residual, cos, sin, ctx)
            self.q[:size].copy_(q)
            self.residual[:size].copy_(residual)

        fns = [lambda i=i: piece(i) for i in range(len(layers) + 1)]
        if not self.capture_graphs:
            return fns
        logger.info("capturing %d prefill graph pieces for %d rows (LoRA terms %d)", len(fns), size, terms)
        # Warm-up runs write keys: point every row at the scratch block until the iteration loads its own slots.
        self.slot_mapping[:size].zero_()
        return [capture_graph(fn, self.device, self.pool)[0].replay for fn in fns]
