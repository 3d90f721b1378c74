"""Pretraining the tiny base model on generic scene descriptions, resumable from its work directory."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from apps.datasets.splits import SynthDataset
from apps.model import tiny
from apps.model.corpus import tokenizer_corpus
from apps.model.describe import DESCRIBE_PROMPTS, describe
from apps.model.encoding import Encoder, Example, shifted_loss
from apps.model.recipes import PretrainConfig

logger = logging.getLogger(__name__)

PRETRAIN_SEED = 7  # dataset seed of pretraining stills; adapters train on seed 0 of the same split
STATE_FILE = "state.pt"
# Settings a resumed run may change (training longer stretches the schedule from where it is).
RESUMABLE_CHANGES = ("steps", "save_every", "log_every")
MICRO_BATCHES = 4


def _lr(cfg: PretrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def _optimizer(model, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """AdamW; matrices decay, except embeddings (unused query tokens keep their distinct random rows)."""
    decay, keep = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and "embed_tokens" not in name else keep).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def examples(split: str, start: int, count: int, seed: int, size: int) -> list[Example]:
    """Description examples for stills start..start+count of a split; the prompt rotates with the index."""
    data = SynthDataset(split, start + count, seed=seed, size=size)
    out = []
    for index in range(start, start + count):
        sample = data[index]
        prompt = DESCRIBE_PROMPTS[index % len(DESCRIBE_PROMPTS)]
        out.append(Example("describe", prompt, sample.image, describe(sample.truth)))
    return out


class Pretrainer:
    """Builds (or resumes) the model and steps through batches of fresh synthetic stills."""

    def __init__(self, work_dir: Path, cfg: PretrainConfig, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.work = Path(work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.step = 0
        self._init_tokenizer()
        self.processor = tiny.image_processor(cfg.preset)
        self.model = tiny.build_model(cfg.preset, self.tokenizer, seed=cfg.seed).train().to(self.device)
        self.encoder = Encoder(self.tokenizer, self.processor, self.model.config.vision_config.spatial_merge_size)
        self.optimizer = _optimizer(self.model, cfg)
        self._resume()
        self.val = examples("val", 0, 32, PRETRAIN_SEED, cfg.image_size)

    def _init_tokenizer(self) -> None:
        from transformers import AutoTokenizer

        folder = self.work / "tokenizer"
        if (folder / "tokenizer.json").is_file():
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            return
        self.tokenizer = tiny.train_tokenizer(tokenizer_corpus(), self.cfg.vocab_size, tiny.QUERY_TOKENS)
        self.tokenizer.save_pretrained(folder)
        logger.info("trained a %s-token tokenizer", len(self.tokenizer))

    def _resume(self) -> None:
        path = self.work / STATE_FILE
        if not path.is_file():
            return
        state = torch.load(path, weights_only=False, map_location=self.device)
        mine = {k: v for k, v in asdict(self.cfg).items() if k not in RESUMABLE_CHANGES}
        theirs = {k: v for k, v in state["config"].items() if k not in RESUMABLE_CHANGES}
        if mine != theirs:
            raise ValueError(f"{path} was written by a run with another config: {state['config']}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        logger.info("resumed pretraining at step %s", self.step)

    def save_state(self) -> None:
        tmp = self.work / (STATE_FILE + ".tmp")
        torch.save({"config": asdict(self.cfg), "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "step": self.step}, tmp)
        tmp.replace(self.work / STATE_FILE)

    def train_step(self) -> float:
        """One optimizer step; the batch runs as length-sorted micro-batches, so little compute goes to padding."""
        cfg = self.cfg
        batch_examples = examples("train", self.step * cfg.batch_size, cfg.batch_size, PRETRAIN_SEED, cfg.image_size)
        batch_examples.sort(key=lambda ex: len(ex.target or ""))
        for group in self.optimizer.param_groups:
            group["lr"] = _lr(cfg, self.step)
        total = 0.0
        size = max(1, cfg.batch_size // MICRO_BATCHES)
        for i in range(0, len(batch_examples), size):
            part = batch_examples[i : i + size]
            batch = self.encoder.batch(part)
            logits = self.model(**self._inputs(batch)).logits  # logits: [micro batch, seq, vocab]
            loss = shifted_loss(logits, batch.labels.to(self.device)) * len(part) / len(batch_examples)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total

    @torch.no_grad()
    def val_loss(self) -> float:
        self.model.eval()
        losses = []
        for i in range(0, len(self.val), 16):
            batch = self.encoder.batch(self.val[i : i + 16])
            logits = self.model(**self._inputs(batch)).logits
            losses.append(float(shifted_loss(logits, batch.labels.to(self.device))))
        self.model.train()
        return sum(losses) / len(losses)

    @torch.no_grad()
    def sample(self, example: Example, max_new_tokens: int = 96) -> str:
        self.model.eval()
        batch = self.encoder.batch([Example(example.task, example.prompt, example.image)])
        out = self.model.generate(**self._inputs(batch), max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=self.encoder.eos_id, pad_token_id=self.encoder.pad_id)
        self.model.train()
        return self.tokenizer.decode(out[0, batch.input_ids.shape[1]:], skip_special_tokens=True)

    def _inputs(self, batch) -> dict:
        """The batch's model inputs on the training device."""
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.model_inputs().items()}

    def run(self) -> None:
        cfg = self.cfg
        start, losses = time.time(), []
        while self.step < cfg.steps:
            losses.append(self.train_step())
            if self.step % cfg.log_every == 0:
                rate = len(losses) * cfg.batch_size / (time.time() - start)
                logger.info("step %s/%s loss %.4f lr %.2e (%.1f samples/s)", self.step, cfg.steps,
                            sum(losses) / len(losses), _lr(cfg, self.step), rate)
                start, losses = time.time(), []
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save_state()
                logger.info("step %s val loss %.4f | %s", self.step, self.val_loss(), self.sample(self.val[0]))
                logger.info("truth: %s", self.val[0].target)
                start, losses = time.time(), []

    def export(self, out_dir: Path, dtype: torch.dtype = torch.float16) -> Path:
        """Write the HF checkpoint (weights stored in ``dtype``; they load in fp32 through transformers)."""
        self.model.to("cpu", dtype)
        try:
            return tiny.save_checkpoint(out_dir, self.model, self.tokenizer, self.processor)
        finally:
            self.model.to(self.device, torch.float32)


def pretrain(out_dir: str | Path, work_dir: str | Path, cfg: PretrainConfig, device: str = "auto") -> Path:
    """Train (or finish training) the base model on ``device`` ('auto': CUDA when present) and write it to
    ``out_dir``."""
    torch.manual_seed(cfg.seed)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    trainer = Pretrainer(Path(work_dir), cfg, device)
    trainer.run()
    return trainer.export(Path(out_dir))
