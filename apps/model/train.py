"""Training one PEFT LoRA adapter (and its tasks' heads, jointly) for one or more tasks, saved in PEFT format."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from apps.model import tiny
from apps.model.encoding import IGNORE, Encoder, Example, prompt_states
from apps.model.frames import FrameSet
from apps.model.grid_heads import GridBoxHead, GroundingHead
from apps.model.heads import HEADS_DIR, CountingHead, load_head, save_head
from apps.model.recipes import AdapterRecipe
from apps.tasks import Task, get_task
from engine.heads import TaskHead

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.json"
TRAINING_FILE = "training.json"  # wall time and final loss of the run that trained an adapter
REFERENCE_FRAME = 224  # side of the frames the box head's grid is sized for (the synthetic frames)
VISION_TARGETS = ("qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "merger.mlp.0",
                  "merger.mlp.2")


def load_base(base_dir: str | Path):
    """(model in fp32 eval mode, tokenizer, image processor) of the base checkpoint."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from engine.hf_engine import load_checkpoint_parts

    folder, tokenizer, processor = load_checkpoint_parts(str(base_dir))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, tokenizer, processor


def target_regex(targets: tuple[str, ...], vision: bool) -> str:
    """PEFT target_modules: the language model's projections, and the vision tower's when asked."""
    lm = tiny.lm_target_regex(targets)
    if not vision:
        return lm
    names = "|".join(t.replace(".", r"\.") for t in VISION_TARGETS)
    return rf"({lm}|.*visual\..*({names})$)"


def build_head(task: Task, encoder: Encoder, hidden_size: int, adapter: str) -> TaskHead | None:
    """The head a task declares, sized for its head prompt; None for tasks without one."""
    if task.head is None:
        return None
    if task.head == "counting-head":
        return CountingHead(hidden_size, task.classes, adapter=adapter)
    # The image tokens of a reference frame: the detector's cells (what follows them is its tail) and the
    # grounding head's cells.
    _, grid = encoder.pixels([np.zeros((REFERENCE_FRAME, REFERENCE_FRAME, 3), dtype=np.uint8)])
    t, h, w = (int(v) for v in grid[0])
    merge = encoder.prompts.merge_len ** 0.5
    rows, cols = int(h // merge), int(w // merge)
    if task.head == "detection-head":
        ids = encoder.prompts.build(task.prompt(), [[t, h, w]])
        last_image = max(i for i, tok in enumerate(ids) if tok == encoder.prompts.image_token_id)
        return GridBoxHead(hidden_size, rows=rows, cols=cols, tail=len(ids) - 1 - last_image, classes=task.classes,
                           adapter=adapter)
    if task.head == "grounding-head":
        # The window reaches back to the first prompt token for the shortest expression (one token).
        ids = encoder.prompts.build(task.prompt("x"), [[t, h, w]])
        last_image = max(i for i, tok in enumerate(ids) if tok == encoder.prompts.image_token_id)
        slack = ids.index(encoder.vision_start_id)
        return GroundingHead(hidden_size, rows=rows, cols=cols, tail=len(ids) - 1 - last_image + slack, slack=slack,
                             adapter=adapter)
    raise ValueError(f"no head implementation for {task.head!r} of task {task.name}")


def task_examples(task: Task, frames: FrameSet, with_head: bool) -> tuple[list[Example], list[Example]]:
    """(text examples, head examples) of a task over every frame of a FrameSet."""
    text, head = [], []
    for index, truth in enumerate(frames.truths):
        for item in task.items(truth):
            text.append(Example(task.name, task.prompt(item), None, task.target_text(truth, item), frame=index,
                                item=item))
            if with_head:
                # Whole-frame tasks (item None) have one head target per frame; the others one per item.
                target = task.head_target(truth) if item is None else task.head_target(truth, item)
                head.append(Example(task.name, task.prompt(item), None, head_target=target, frame=index,
                                    item=item))
    return text, head


@dataclass
class TrainResult:
    name: str
    path: Path
    recipe: AdapterRecipe
    seconds: float
    final_loss: float


class AdapterTrainer:
    """One adapter (PEFT LoRA over the base) plus the heads of its tasks, trained together on mixed batches."""

    def __init__(self, base, tokenizer, processor, recipe: AdapterRecipe, frames: FrameSet, name: str,
                 init: Path | None = None, focus: str | None = None) -> None:
        """``init``: a saved adapter of the same rank (and its heads) to continue from; ``focus``: a task that gets
        half of every batch (the one just added to a warm-started adapter)."""
        from peft import LoraConfig, get_peft_model

        self.recipe, self.frames, self.name = recipe, frames, name
        self.encoder = Encoder(tokenizer, processor, base.config.vision_config.spatial_merge_size)
        if not recipe.vision:
            frames.encode(base, self.encoder)
        torch.manual_seed(recipe.seed)
        config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0,
                            target_modules=target_regex(recipe.targets, recipe.vision))
        self.model = get_peft_model(base, config, adapter_name=name)
        if init is not None:
            self._load_lora(Path(init))
        hidden = base.config.text_config.hidden_size
        self.tasks = [get_task(t) for t in recipe.tasks]
        self.heads: dict[str, TaskHead] = {}
        self.pools: list[list[Example]] = []
        weights: list[float] = []
        for task in self.tasks:
            head = build_head(task, self.encoder, hidden, name) if recipe.heads else None
            saved = Path(init) / HEADS_DIR / f"{task.head}.json" if init is not None and head is not None else None
            if saved is not None and saved.is_file():
                head = load_head(saved)[1]
                head.adapter = name
            text, head_examples = task_examples(task, frames, head is not None)
            new_pools = [text] if head is None or recipe.text else []
            new_pools += [head_examples] if head is not None else []
            if head is not None:
                self.heads[task.name] = head.train()
            self.pools += new_pools
            weights += [(2.0 if task.name == focus else 1.0)] * len(new_pools)
        if focus is not None and len(self.tasks) > 1:
            # The focus task's pools share half the batch, the others the other half.
            share = {True: sum(w for w in weights if w == 2.0), False: sum(w for w in weights if w == 1.0)}
            weights = [0.5 * w / share[w == 2.0] for w in weights]
        self.weights = np.asarray(weights) / sum(weights)
        lora = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": lora, "lr": recipe.lr}]
        groups += [{"params": list(h.parameters()), "lr": recipe.head_lr} for h in self.heads.values()]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        self.rng = np.random.default_rng(recipe.seed)

    def _load_lora(self, folder: Path) -> None:
        """Continue from a saved adapter of this rank or a smaller one: its A rows and B columns fill the first
        slots, the new B columns stay zero, so with the same alpha / rank the model's function is unchanged."""
        from safetensors.torch import load_file

        saved = json.loads((folder / "adapter_config.json").read_text())
        if saved["lora_alpha"] / saved["r"] != self.recipe.alpha / self.recipe.rank or saved["r"] > self.recipe.rank:
            raise ValueError(f"adapter {folder} (rank {saved['r']}, alpha {saved['lora_alpha']}) cannot seed rank "
                             f"{self.recipe.rank}, alpha {self.recipe.alpha}")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for key, value in load_file(str(folder / "adapter_model.safetensors")).items():
                target = re.sub(r"\.lora_([AB])\.weight$", rf".lora_\1.{self.name}.weight", key)
                if target not in params:
                    raise ValueError(f"adapter {folder} does not fit this recipe: no parameter for {key}")
                param = params[target]
                if ".lora_A." in target:
                    param[: value.shape[0]] = value.float()  # A: [rank, in]
                else:
                    param[:, : value.shape[1]] = value.float()  # B: [out, rank]
        logger.info("adapter %s continues from %s (rank %s -> %s)", self.name, folder, saved["r"], self.recipe.rank)

    def _sample(self) -> list[Example]:
        """A batch drawn from the example pools (every task's text, every head) by their weights."""
        picks = self.rng.choice(len(self.pools), size=self.recipe.batch_size, p=self.weights)
        return [self.pools[p][int(self.rng.integers(len(self.pools[p])))] for p in picks]

    def _loss(self, examples: list[Example]) -> torch.Tensor:
        batch = self.encoder.batch(examples, self.frames, cached=not self.recipe.vision)
        need_hidden = any(ex.head_target is not None for ex in examples)
        out = self.model(**batch.model_inputs(), output_hidden_states=need_hidden)
        # Per-example mean over answer tokens, then the mean over examples: a one-word answer weighs as much as
        # a long detection list.
        logits, labels = out.logits[:, :-1], batch.labels[:, 1:]  # [batch, seq - 1, vocab], [batch, seq - 1]
        token_loss = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2).float(), labels, ignore_index=IGNORE, reduction="none")  # [batch, seq - 1]
        counted = (labels != IGNORE).sum(1)
        rows = counted > 0
        loss = (token_loss.sum(1)[rows] / counted[rows]).sum() / len(examples)
        for task_name, head in self.heads.items():
            index = [i for i, ex in enumerate(examples) if ex.task == task_name and ex.head_target is not None]
            if not index:
                continue
            if isinstance(head, GroundingHead):
                self._calibrate(head, out.hidden_states[-1][index[0]], batch.input_ids[index[0]])
            states = prompt_states(out.hidden_states[-1][index], batch.prompt_lens[index], head.positions)
            targets = [head.target(examples[i].head_target) for i in index]
            loss = loss + head.loss(head(states), targets) * len(index) / len(examples)
        return loss

    def _calibrate(self, head: GroundingHead, hidden: torch.Tensor, ids: torch.Tensor) -> None:
        """Give a grounding head the <|vision_start|> state of the adapter as it is now; hidden: [seq, dim]."""
        at = (ids == self.encoder.vision_start_id).nonzero()
        if len(at) != 1:
            raise ValueError(f"a grounding prompt holds {len(at)} <|vision_start|> tokens, not one")
        head.calibrate(hidden[int(at[0, 0])])

    @torch.no_grad()
    def recalibrate(self) -> None:
        """Calibrate the grounding heads on the trained adapter (the last step changed it after their last look)."""
        for task_name, head in self.heads.items():
            if not isinstance(head, GroundingHead):
                continue
            example = next(ex for pool in self.pools for ex in pool if ex.task == task_name)
            batch = self.encoder.batch([example], self.frames, cached=not self.recipe.vision)
            out = self.model(**batch.model_inputs(), output_hidden_states=True)
            self._calibrate(head, out.hidden_states[-1][0], batch.input_ids[0])

    def train(self) -> float:
        recipe, start, recent = self.recipe, time.time(), []
        self.model.train()
        for step in range(1, recipe.steps + 1):
            scale = min(1.0, step / 20) * (0.1 + 0.9 * (1 - step / recipe.steps))  # warm-up, linear decay
            for group, base_lr in zip(self.optimizer.param_groups, self._base_lrs(), strict=True):
                group["lr"] = base_lr * scale
            loss = self._loss(self._sample())
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            recent.append(loss.item())
            if step % recipe.log_every == 0 or step == recipe.steps:
                logger.info("adapter %s step %s/%s loss %.4f (%.1f s)", self.name, step, recipe.steps,
                            sum(recent) / len(recent), time.time() - start)
                recent = recent[-5:]
        self.model.eval()
        for head in self.heads.values():
            head.eval()
        self.recalibrate()
        return sum(recent) / max(1, len(recent))

    def _base_lrs(self) -> list[float]:
        return [self.recipe.lr] + [self.recipe.head_lr] * len(self.heads)

    def save(self, out_dir: str | Path) -> Path:
        """PEFT folder (adapter_config.json + fp16 adapter_model.safetensors), heads/ and recipe.json."""
        from safetensors.torch import load_file, save_file

        out = Path(out_dir)
        self.model.save_pretrained(out, selected_adapters=[self.name])
        nested = out / self.name  # peft writes non-default adapters into a sub-folder
        if nested.is_dir():
            for f in nested.iterdir():
                f.replace(out / f.name)
            nested.rmdir()
        (out / "README.md").unlink(missing_ok=True)  # peft's model-card template says nothing here
        weights = out / "adapter_model.safetensors"
        save_file({k: v.half() for k, v in load_file(str(weights)).items()}, str(weights))
        for task_name, head in self.heads.items():
            save_head(out, get_task(task_name).head, head)
        (out / RECIPE_FILE).write_text(json.dumps(asdict(self.recipe), indent=2) + "\n")
        return out

    def unload(self):
        """The base model without this adapter's LoRA layers, for the next adapter."""
        return self.model.unload()


def train_adapter(base_dir: str | Path, recipe: AdapterRecipe, frames: FrameSet, out_dir: str | Path,
                  name: str, base_parts=None, init: Path | None = None,
                  focus: str | None = None) -> tuple[TrainResult, AdapterTrainer]:
    """Train and save one adapter; ``base_parts`` reuses a loaded (model, tokenizer, processor)."""
    model, tokenizer, processor = base_parts or load_base(base_dir)
    start = time.time()
    trainer = AdapterTrainer(model, tokenizer, processor, recipe, frames, name, init=init, focus=focus)
    loss = trainer.train()
    path = trainer.save(out_dir)
    seconds = time.time() - start
    (path / TRAINING_FILE).write_text(json.dumps({"seconds": round(seconds, 1), "final_loss": round(loss, 4)}) + "\n")
    logger.info("trained adapter %s (%s, rank %s) in %.0f s", name, ",".join(recipe.tasks), recipe.rank, seconds)
    return TrainResult(name, path, recipe, seconds, loss), trainer
