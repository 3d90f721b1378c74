"""A detection LoRA adapter fine-tuned on a clip's own ground truth, for the browser test.

The tiny checkpoint has random weights, so no adapter of it writes parsable detection text. The browser test needs
boxes that come out of the real serving path (engine -> worker -> parser -> results -> overlay), so this fits a LoRA
adapter, by teacher forcing, to the detection target text of the exact frames the test will stream: it memorises them.
Its boxes are therefore the clip's truth boxes as the model writes them; they prove the path, not model quality.
"""

from __future__ import annotations

import logging
from pathlib import Path

import av
import torch

from apps.datasets.synth import read_truth, sidecar_path
from apps.model.tiny import lm_target_regex
from apps.tasks import get_task
from engine.images import decode_image
from engine.prompt import PromptBuilder
from pipeline.frames import encode_jpeg

logger = logging.getLogger(__name__)


def clip_frames(video: Path, indices: list[int]) -> dict[int, bytes]:
    """The JPEGs the ingestor publishes for these frame indices (decoded with PyAV, default ingest encoding)."""
    out: dict[int, bytes] = {}
    with av.open(str(video)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in indices:
                out[index] = encode_jpeg(frame.to_ndarray(format="rgb24"), 640, 85)[0]
    return out


def train_detection_adapter(checkpoint: Path, video: Path, indices: list[int], out_dir: Path, rank: int = 8,
                            lr: float = 3e-3, max_steps: int = 400, check_every: int = 10,
                            max_loss: float = 0.1) -> tuple[Path, int]:
    """Fit a LoRA adapter until greedy decoding writes each frame's detection target exactly, with a margin (mean
    target loss below ``max_loss``); returns (folder, steps)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    # The random model's logits are nearly flat and its final norm bounds what the inner layers can change, so the
    # adapter also targets lm_head: with it the frames are memorised in tens of steps instead of hundreds.
    targets = f"({lm_target_regex()})|(lm_head)"
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    builder = PromptBuilder(tokenizer, model.config.vision_config.spatial_merge_size)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    task = get_task("detection")
    truths = {t.frame: t for t in read_truth(sidecar_path(video))}
    examples = []
    for index, jpeg in clip_frames(video, indices).items():
        pixels = processor(images=[decode_image(jpeg)], return_tensors="pt")
        prompt = builder.build(task.prompt(), pixels["image_grid_thw"].tolist())
        target = tokenizer(task.target_text(truths[index]), add_special_tokens=False)["input_ids"] + [eos]
        examples.append((prompt, target, pixels, task.target_text(truths[index])))
    batch = _batch(examples)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    for step in range(1, max_steps + 1):
        model.train()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % check_every == 0:
            logger.debug("step %d loss %.4f", step, loss.item())
            if loss.item() < max_loss and all(_greedy(model, tokenizer, eos, ex) == ex[3] for ex in examples):
                model.save_pretrained(out_dir, save_embedding_layers=False)  # LoRA weights only
                logger.info("detection adapter memorised %d frames in %d steps", len(examples), step)
                return out_dir, step
    raise RuntimeError(f"the detection adapter did not memorise the frames within {max_steps} steps")


def _batch(examples) -> dict[str, torch.Tensor]:
    """One padded training batch: prompt positions and padding carry label -100 (no loss)."""
    width = max(len(prompt) + len(target) for prompt, target, _, _ in examples)
    ids, labels, mask = [], [], []
    for prompt, target, _, _ in examples:
        pad = width - len(prompt) - len(target)
        ids.append(prompt + target + [0] * pad)
        labels.append([-100] * len(prompt) + target + [-100] * pad)
        mask.append([1] * (len(prompt) + len(target)) + [0] * pad)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask),
            "pixel_values": torch.cat([ex[2]["pixel_values"] for ex in examples]),
            "image_grid_thw": torch.cat([ex[2]["image_grid_thw"] for ex in examples])}


def _greedy(model, tokenizer, eos: int, example) -> str:
    prompt, target, pixels, _ = example
    model.eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels["pixel_values"],
                             image_grid_thw=pixels["image_grid_thw"], max_new_tokens=len(target) + 4, do_sample=False,
                             eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    new = out[0, len(prompt):].tolist()
    return tokenizer.decode(new[: new.index(eos)] if eos in new else new, skip_special_tokens=True)
