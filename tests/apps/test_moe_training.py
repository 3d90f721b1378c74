"""MoE-LoRA training (CPU, tiny model): routing semantics of each scheme, gating, resumable training, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from apps.moe.model import MoELoRAModel, balance_loss, dense_gates
from apps.moe.train import MoERecipe
from engine.moe.spec import read_moe_spec

torch.set_num_threads(1)


def hf(tiny_checkpoint):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint / "base", dtype=torch.float32).eval()


def test_dense_gates_are_a_softmax_over_the_top_k():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, -1.0, 5.5, 0.0]])
    gates = dense_gates(logits, 2)
    want = torch.zeros(2, 4)
    want[0, [1, 3]] = torch.softmax(torch.tensor([3.0, 2.0]), 0)
    want[1, [2, 0]] = torch.softmax(torch.tensor([5.5, 5.0]), 0)
    assert torch.allclose(gates, want)
    # Perfectly balanced routing scores k; routing every token to the same experts scores more.
    uniform = torch.zeros(64, 1, 8)
    spread = dense_gates(torch.eye(8).repeat(8, 1)[:, None] + torch.roll(torch.eye(8), 1, 1).repeat(8, 1)[:, None], 2)
    assert balance_loss(uniform, spread).item() == pytest.approx(2.0)
    skewed = dense_gates(torch.tensor([[5.0, 4.0] + [0.0] * 6]).repeat(64, 1)[:, None], 2)
    assert balance_loss(torch.tensor([[5.0, 4.0] + [0.0] * 6]).repeat(64, 1)[:, None], skewed).item() > 2.0


@pytest.mark.parametrize("routing", ["pregated", "per_layer", "block"])
def test_routing_schemes_route_where_they_should(tiny_checkpoint, tmp_path, routing):
    recipe = MoERecipe(routing=routing, num_experts=4, top_k=2, rank=4)
    spec = recipe.spec("m", tmp_path / "m", 2)
    model = MoELoRAModel(hf(tiny_checkpoint), spec)
    model.init_random(0, b_std=0.05)
    ids = torch.tensor([[1, 40, 50, 60, 70, 2]])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    gates = model.state.gates
    routers = set(model.routers)
    if routing == "pregated":
        assert routers == {"global"}
        assert set(gates) == {(layer, g) for layer in range(2) for g in ("qkv", "o", "gate_up", "down")}
        assert all(torch.equal(gates[(layer, "qkv")], gates[(layer, "down")]) for layer in range(2))  # one per layer
        assert not torch.equal(gates[(0, "qkv")], gates[(1, "qkv")])  # but a different one for each layer
    elif routing == "per_layer":
        assert routers == {f"{layer}_{g}" for layer in range(2) for g in ("qkv", "o", "gate_up", "down")}
        assert not torch.equal(gates[(0, "qkv")], gates[(0, "o")])
    else:
        assert routers == {"0_gate_up", "1_gate_up"} and set(spec.target_modules) == {"gate_proj", "up_proj",
                                                                                       "down_proj"}
        assert set(gates) == {(layer, g) for layer in range(2) for g in ("gate_up", "down")}
    for g in gates.values():
        assert g.shape == (6, 4) and torch.allclose(g.sum(-1), torch.ones(6)) and ((g > 0).sum(-1) == 2).all()
    model.save(tmp_path / "m")
    assert read_moe_spec(tmp_path / "m").routing == routing
    again = MoELoRAModel.from_folder(hf(tiny_checkpoint), tmp_path / "m")
    for a, b in zip(model.trainable(), again.trainable(), strict=True):
        assert torch.equal(a, b)


def test_training_lowers_the_loss_and_resumes_exactly(tiny_checkpoint, tmp_path):
    from apps.moe.data import Frames
    from apps.moe.train import MoETrainer, load_base

    recipe = MoERecipe(tasks=("vqa", "counting"), num_experts=4, top_k=2, rank=4, steps=8, batch_size=4, lr=1e-2,
                       train_frames=6, log_every=1, save_every=3)

    def trainer(work):
        base, tok, proc = load_base(tiny_checkpoint / "base")
        return MoETrainer(base, tok, proc, recipe, Frames("train", recipe.train_frames), "m", work)

    straight = trainer(tmp_path / "a")
    straight.train()
    losses = [h["loss"] for h in straight.history]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    # The same run stopped after step 6 (its state saved, as by a kill after a save) and resumed afresh.
    trainer(tmp_path / "b").train(until=6)
    resumed = trainer(tmp_path / "b")
    assert resumed.step == 6
    resumed.train()
    for a, b in zip(straight.model.trainable(), resumed.model.trainable(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="another recipe"):
        base, tok, proc = load_base(tiny_checkpoint / "base")
        MoETrainer(base, tok, proc, MoERecipe(**{**recipe.__dict__, "rank": 8}), Frames("train", 6), "m",
                   tmp_path / "b")


def test_compare_cli_trains_scores_and_writes_the_table(tiny_checkpoint, tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "table.json"
    code = main(["moe", "compare", "--base", str(tiny_checkpoint / "base"), "--routings", "pregated,block",
                 "--tasks", "vqa,counting", "--experts", "4", "--rank", "4", "--steps", "2", "--batch-size", "2",
                 "--train-frames", "4", "--eval-frames", "2", "--work", str(tmp_path / "work"),
                 "--out", str(tmp_path / "adapters"), "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| pregated |" in printed and "| block |" in printed and "none (base model)" in printed
    results = json.loads(out.read_text())
    assert [r["routing"] for r in results] == ["none (base model)", "pregated", "block"]
    assert set(results[1]["metrics"]) == {"vqa", "counting"}
    assert read_moe_spec(tmp_path / "adapters" / "moe-block").routing == "block"
    # Re-scoring a saved adapter on fresh held-out stills (another seed) gives a result of the same shape.
    code = main(["moe", "eval", str(tmp_path / "adapters" / "moe-pregated"), "--base", str(tiny_checkpoint / "base"),
                 "--tasks", "vqa", "--eval-frames", "2", "--eval-seed", "1", "--json", str(tmp_path / "e.json")])
    assert code == 0
    (scored,) = json.loads((tmp_path / "e.json").read_text())
    assert scored["routing"] == "pregated" and set(scored["metrics"]) == {"vqa"} and scored["eval_seed"] == 1
