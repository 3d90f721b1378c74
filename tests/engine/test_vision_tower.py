"""VisionTower: our sync-free encoder forward, and its CUDA graphs, against transformers' Qwen2.5-VL vision module."""

from __future__ import annotations

import pytest
import torch

from apps.model.tiny import tiny_config
from engine.model.spec import parse_config
from engine.model.vision import Picture, VisionLoRA, VisionTower, host_layout

# Window attention over 2 x 2 merged units (16 patches): every grid here spans several windows, some cut short by
# the picture's edge; (1, 4, 4) is a single window, (2, 4, 6) a two-frame clip (full attention per frame).
GRIDS = [(1, 8, 12), (1, 10, 6), (1, 4, 4)]
PATCH_DIM = 3 * 2 * 14 * 14  # channels * temporal patch * patch * patch
LORA_PATHS = ["blocks.0.attn.qkv", "blocks.1.attn.proj", "blocks.2.mlp.gate_proj", "blocks.3.mlp.down_proj",
              "merger.mlp.0", "merger.mlp.2"]


def tiny_tower(device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0, **kwargs) -> VisionTower:
    """Four blocks (block 1 full attention, the others windowed) with every weight random, norms and biases too."""
    cfg = tiny_config("test", vocab_size=320).to_dict()
    cfg["vision_config"].update(depth=4, fullatt_block_indexes=[1], window_size=56)
    tower = VisionTower(parse_config(cfg), None, torch.device(device), dtype, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in tower.module.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen).to(param))
    return tower


def pictures(grids: list[tuple[int, int, int]], seed: int = 1) -> list[Picture]:
    gen = torch.Generator().manual_seed(seed)
    return [Picture(torch.randn(t * h * w, PATCH_DIM, generator=gen), (t, h, w), t * h * w // 4) for t, h, w in grids]


def random_lora(tower: VisionTower, seed: int = 2, rank: int = 4) -> VisionLoRA:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for path in LORA_PATHS:
        linear = tower.module.get_submodule(path)
        a = 0.2 * torch.randn(rank, linear.in_features, generator=gen)
        b = 0.2 * torch.randn(linear.out_features, rank, generator=gen)
        modules[path] = (a.to(tower.device, tower.dtype), b.to(tower.device, tower.dtype), 0.5)
    return VisionLoRA("tiny", modules)


@torch.no_grad()
def transformers_encode(tower: VisionTower, pics: list[Picture], lora: VisionLoRA | None = None) -> list[torch.Tensor]:
    """transformers' own forward of the tower's module (with the same LoRA hooks), split per picture."""
    pixels = torch.cat([p.pixel_values for p in pics]).to(tower.device, tower.dtype)
    grids = torch.tensor([p.grid for p in pics], device=tower.device)
    with tower._lora_hooks(lora):
        out = tower.module(pixels, grid_thw=grids)
    merged = out.pooler_output if hasattr(out, "pooler_output") else out
    return list(merged.split([p.num_tokens for p in pics]))


def assert_same(ours: list[torch.Tensor], ref: list[torch.Tensor], atol: float) -> None:
    assert [o.shape for o in ours] == [r.shape for r in ref]
    for o, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=0, atol=atol)


def test_window_order_matches_transformers():
    vision_utils = pytest.importorskip("transformers.vision_utils")  # its public helpers (recent transformers)
    grids = GRIDS + [(2, 4, 6)]
    layout = host_layout(tuple(grids), merge=2, window=2)
    window_index, cu_windows = vision_utils.get_vision_window_index(torch.tensor(grids), 2, 56, 14)
    units = layout.order.reshape(-1, 4)[:, 0] // 4
    assert units.tolist() == window_index.tolist()
    assert [0, *torch.tensor(layout.window_lengths).cumsum(0).tolist()] == cu_windows.tolist()
    assert len(layout.window_lengths) > len(grids) + 4, "the pictures must split into several windows each"


@pytest.mark.parametrize("grids", [GRIDS, [(1, 10, 6)], GRIDS + [(2, 4, 6)]], ids=["three", "one", "clip"])
def test_encode_matches_transformers(grids):
    tower = tiny_tower()
    pics = pictures(grids)
    ours = tower.encode(pics)
    assert_same(ours, transformers_encode(tower, pics), atol=1e-5)
    assert tower.images_encoded == len(grids)
    # The same grids again reuse the plan; a different picture order is another plan, and as exact.
    assert_same(tower.encode(pics[::-1]), transformers_encode(tower, pics[::-1]), atol=1e-5)


def test_encode_with_vision_lora_matches_transformers_hooks():
    tower = tiny_tower()
    pics, lora = pictures(GRIDS), random_lora(tower)
    ours = tower.encode(pics, lora)
    assert_same(ours, transformers_encode(tower, pics, lora), atol=1e-5)
    plain = torch.cat(tower.encode(pics))
    assert (torch.cat(ours) - plain).abs().max() > 1e-2, "the LoRA must change the embeddings"
    assert all(not m._forward_hooks for m in tower.module.modules()), "hooks outlive the encode"


def test_checkpoint_tower_matches_transformers(make_engine, tiny_checkpoint):
    """The engine's tower, loaded from the tiny checkpoint, against the full transformers model's vision module."""
    from engine.images import decode_image
    from tests.engine.reference import hf_model, jpeg

    tower = make_engine().vision
    pics = [tower.preprocess(decode_image(jpeg(seed, size))) for seed, size in
            [(1, (112, 168)), (2, (140, 84)), (3, (112, 112))]]
    visual = hf_model(tiny_checkpoint / "base", None).model.visual
    pixels = torch.cat([p.pixel_values for p in pics])
    with torch.no_grad():
        out = visual(pixels, grid_thw=torch.tensor([p.grid for p in pics]))
    ref = (out.pooler_output if hasattr(out, "pooler_output") else out).split([p.num_tokens for p in pics])
    assert_same(tower.encode(pics), list(ref), atol=1e-5)


@pytest.mark.gpu
def test_cuda_graphs_replay_the_eager_encode():
    """bf16 on CUDA: graph replays equal the eager forward, track fp32 transformers, and are captured per key."""
    exact = tiny_tower()  # fp32 on the CPU, transformers' forward: the reference
    weights = exact.module.state_dict()
    graphed, eager = tiny_tower("cuda", torch.bfloat16), tiny_tower("cuda", torch.bfloat16, cuda_graphs=False)
    for tower in (graphed, eager):
        tower.load_state_dict(weights)
    pics, other = pictures(GRIDS), pictures(GRIDS, seed=5)
    rel = lambda a, b: ((a.float().cpu() - b).norm() / b.norm()).item()

    first_parts = graphed.encode(pics)
    first = torch.cat(first_parts)
    key = (tuple(GRIDS), None)
    assert list(graphed.graphs) == [key] and not eager.graphs
    ref = torch.cat(transformers_encode(exact, pics))
    theirs = torch.cat(transformers_encode(eager, pics))  # transformers' own bf16 forward on the GPU
    assert rel(first, ref) <= 2 * rel(theirs, ref) + 5e-3, (rel(first, ref), rel(theirs, ref))
    assert rel(first, torch.cat(eager.encode(pics)).float().cpu()) < 1e-2

    captured = graphed.graphs[key]
    second = torch.cat(graphed.encode(other))  # same grids, other pixels: a replay of the same graph
    assert graphed.graphs[key] is captured and len(graphed.graphs) == 1
    assert rel(second, torch.cat(eager.encode(other)).float().cpu()) < 1e-2
    assert torch.equal(torch.cat(first_parts), first), "the replay overwrote the embeddings returned before"

    graphed.encode(pics[:2])  # another grid tuple: a new graph
    lora = random_lora(graphed)
    with_lora = torch.cat(graphed.encode(pics, lora))  # a vision LoRA: another one again
    assert set(graphed.graphs) == {key, (tuple(GRIDS[:2]), None), (tuple(GRIDS), "tiny")}
    assert rel(with_lora, torch.cat(eager.encode(pics, lora)).float().cpu()) < 1e-2
    assert graphed.images_encoded == 3 + 3 + 2 + 3
