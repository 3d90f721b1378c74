"""Training one MoE-LoRA adapter on the synthetic multi-task domain (CPU, resumable), saved in the engine's format."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from apps.moe.data import IGNORE, TASKS, Encoder, Frames, training_examples
from apps.moe.model import MoELoRAModel
from engine.moe.spec import FFN_PROJECTIONS, PROJECTIONS, ROUTINGS, MoESpec

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class MoERecipe:
    """How one MoE-LoRA adapter is trained; stored with its state so a resumed run cannot silently change it."""

    routing: str = "pregated"
    tasks: tuple[str, ...] = TASKS
    num_experts: int = 8
    top_k: int = 2
    rank: int = 8
    alpha: float = 16.0
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    balance: float = 0.01  # weight of the load-balancing loss
    train_frames: int = 1000
    seed: int = 0
    log_every: int = 25
    save_every: int = 50
    targets: tuple[str, ...] = PROJECTIONS

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be within 1..num_experts ({self.num_experts}), got {self.top_k}")
        if self.steps < 1 or self.batch_size < 1 or self.rank < 1:
            raise ValueError("steps, batch_size and rank must be positive")
        unknown = set(self.tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; known: {', '.join(TASKS)}")

    def spec(self, name: str, folder: Path, num_layers: int) -> MoESpec:
        """The adapter's MoESpec; block routing adapts the FFN projections only (PESC)."""
        targets = tuple(p for p in self.targets if self.routing != "block" or p in FFN_PROJECTIONS)
        return MoESpec(name=name, path=folder, routing=self.routing, num_experts=self.num_experts,
                       top_k=self.top_k, rank=self.rank, alpha=self.alpha, use_rslora=False,
                       target_modules=targets, num_layers=num_layers)


def load_base(base_dir: str | Path):
    """(fp32 eval model, tokenizer, image processor) of a Hugging Face checkpoint directory."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(base_dir), AutoImageProcessor.from_pretrained(base_dir)


class MoETrainer:
    """Mixed-task batches (tasks drawn uniformly) through a MoELoRAModel; AdamW on experts and routers."""

    def __init__(self, base, tokenizer, processor, recipe: MoERecipe, frames: Frames, name: str, work: Path) -> None:
        self.recipe, self.frames, self.name, self.work = recipe, frames, name, work
        merge = base.config.vision_config.spatial_merge_size
        self.encoder = Encoder(tokenizer, merge)
        frames.encode(base, processor)
        spec = recipe.spec(name, work / "adapter", base.config.text_config.num_hidden_layers)
        self.model = MoELoRAModel(base, spec)
        self.model.init_random(recipe.seed)
        self.pools = training_examples(recipe.tasks, frames)
        self.optimizer = torch.optim.AdamW(self.model.trainable(), lr=recipe.lr, weight_decay=0.0)
        self.rng = np.random.default_rng(recipe.seed)
        self.step = 0
        self.history: list[dict] = []
        self._resume()

    def _resume(self) -> None:
        path = self.work / STATE_FILE
        if not path.is_file():
            return
        state = torch.load(path, weights_only=False)
        if state["recipe"] != asdict(self.recipe):
            raise ValueError(f"{path} was written by another recipe; use a new --work directory")
        with torch.no_grad():
            for param, saved in zip(self.model.trainable(), state["params"], strict=True):
                param.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        self.step, self.history = state["step"], state["history"]
        logger.info("resumed %s at step %s", self.name, self.step)

    def _save_state(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        state = {"recipe": asdict(self.recipe), "params": [p.detach().clone() for p in self.model.trainable()],
                 "optimizer": self.optimizer.state_dict(), "rng": self.rng.bit_generator.state, "step": self.step,
                 "history": self.history}
        tmp = self.work / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(self.work / STATE_FILE)

    def _sample(self) -> list:
        tasks = list(self.pools)
        picks = self.rng.integers(len(tasks), size=self.recipe.batch_size)
        return [self.pools[tasks[t]][int(self.rng.integers(len(self.pools[tasks[t]])))] for t in picks]

    def _loss(self, examples: list) -> tuple[torch.Tensor, float]:
        batch = self.encoder.batch(examples, self.frames)
        labels = batch.pop("labels")
        self.model.state.track = True
        out = self.model(**batch)
        self.model.state.track = False
        logits, gold = out.logits[:, :-1], labels[:, 1:]  # [batch, seq - 1, vocab], [batch, seq - 1]
        token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), gold, ignore_index=IGNORE,
                                                       reduction="none")  # [batch, seq - 1]
        counted = (gold != IGNORE).sum(1).clamp(min=1)
        lm = (token_loss.sum(1) / counted).mean()  # each example weighs the same, whatever its answer length
        aux = self.model.aux_loss()
        return lm + self.recipe.balance * aux, float(aux.detach())

    def train(self, until: int | None = None) -> None:
        """Train to the recipe's last step (or stop after step ``until``, saving the state, as a kill would)."""
        recipe, start = self.recipe, time.time()
        last = recipe.steps if until is None else min(until, recipe.steps)
        self.model.train()
        recent: list[float] = []
        while self.step < last:
            self.step += 1
            scale = min(1.0, self.step / 20) * (0.1 + 0.9 * (1 - self.step / recipe.steps))  # warm-up, decay
            for group in self.optimizer.param_groups:
                group["lr"] = recipe.lr * scale
            loss, aux = self._loss(self._sample())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.trainable(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            recent.append(loss.item())
            if self.step % recipe.log_every == 0 or self.step == recipe.steps:
                mean = sum(recent) / len(recent)
                self.history.append({"step": self.step, "loss": mean, "balance": aux})
                logger.info("%s step %s/%s loss %.4f balance %.3f (%.1f s)", self.name, self.step, recipe.steps,
                            mean, aux, time.time() - start)
                recent = []
            if self.step % recipe.save_every == 0 or self.step == last:
                self._save_state()
        self.model.eval()

    def save(self, out_dir: Path) -> Path:
        """The adapter in the engine's MoE-LoRA format, plus recipe.json."""
        path = self.model.save(out_dir)
        (path / "recipe.json").write_text(json.dumps(asdict(self.recipe), indent=2) + "\n")
        return path
