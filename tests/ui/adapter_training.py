"""A detection LoRA adapter fine-tuned on a clip's own ground truth, for the browser test.

The tiny checkpoint has random weights, so no adapter of it writes parsable detection text. The browser test needs
boxes that come out of the real serving path (engine -> worker -> parser -> results -> overlay), so this fits a LoRA
adapter, by teacher forcing, to the detection target text of the exact frames the test will stream: it memorises them.
Its boxes are therefore the clip's truth boxes as the model writes them; they prove the path, not model quality.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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


@dataclass
class Example:
    """One frame to memorise: its JPEG as published, prompt ids, target ids (ending in EOS) and target text."""

    jpeg: bytes
    prompt: list[int]
    target: list[int]
    text: str
    pixels: dict[str, torch.Tensor]


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
    target loss below ``max_loss``), and the hf engine serving it does too; returns (folder, steps)."""
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
    image_token = model.config.image_token_id
    task = get_task("detection")
    truths = {t.frame: t for t in read_truth(sidecar_path(video))}
    examples = []
    for index, jpeg in clip_frames(video, indices).items():
        pixels = processor(images=[decode_image(jpeg)], return_tensors="pt")
        text = task.target_text(truths[index])
        examples.append(Example(jpeg, builder.build(task.prompt(), pixels["image_grid_thw"].tolist()),
                                tokenizer(text, add_special_tokens=False)["input_ids"] + [eos], text, dict(pixels)))
    batch = _batch(examples, image_token)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    for step in range(1, max_steps + 1):
        model.train()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % check_every:
            continue
        logger.debug("step %d loss %.4f", step, loss.item())
        memorised = loss.item() < max_loss and all(_greedy(model, tokenizer, eos, image_token, ex) == ex.text
                                                    for ex in examples)
        if memorised:
            model.save_pretrained(out_dir, save_embedding_layers=False)  # LoRA weights only
            logger.info("detection adapter memorised %d frames in %d steps", len(examples), step)
            check_with_engine(checkpoint, out_dir, examples)
            return out_dir, step
    raise RuntimeError(f"the detection adapter did not memorise the frames within {max_steps} steps")


def check_with_engine(checkpoint: Path, adapter: Path, examples: list[Example]) -> None:
    """The hf engine serving the saved adapter writes each target too, i.e. training saw the engine's inputs."""
    from engine.base import create_engine
    from engine.config import EngineConfig
    from engine.request import EngineRequest, ImageRef, SamplingParams

    engine = create_engine(EngineConfig(backend="hf", model=str(checkpoint), adapters=str(adapter.parent),
                                        device="cpu"))
    try:
        requests = [EngineRequest(adapter=adapter.name, prompt=get_task("detection").prompt(),
                                  images=[ImageRef(id=f"frame-{i}", jpeg=ex.jpeg)],
                                  sampling=SamplingParams(max_tokens=len(ex.target) + 4))
                    for i, ex in enumerate(examples)]
        for ex, result in zip(examples, engine.generate(requests), strict=True):
            if result.text != ex.text:
                raise RuntimeError(f"the hf engine writes {result.text!r} where the adapter learned {ex.text!r}: "
                                   "the training inputs no longer match the engine's")
    finally:
        engine.close()


def _batch(examples: list[Example], image_token: int) -> dict[str, torch.Tensor]:
    """One padded training batch: prompt positions and padding carry label -100 (no loss). Image tokens are marked
    (mm_token_type_ids) as the hf engine marks them, so transformers gives them the same 3-D M-RoPE positions."""
    width = max(len(ex.prompt) + len(ex.target) for ex in examples)
    ids, labels, mask = [], [], []
    for ex in examples:
        pad = width - len(ex.prompt) - len(ex.target)
        ids.append(ex.prompt + ex.target + [0] * pad)
        labels.append([-100] * len(ex.prompt) + ex.target + [-100] * pad)
        mask.append([1] * (len(ex.prompt) + len(ex.target)) + [0] * pad)
    input_ids = torch.tensor(ids)  # [frames, width]
    return {"input_ids": input_ids, "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask),
            "mm_token_type_ids": (input_ids == image_token).int(),
            "pixel_values": torch.cat([ex.pixels["pixel_values"] for ex in examples]),
            "image_grid_thw": torch.cat([ex.pixels["image_grid_thw"] for ex in examples])}


def _greedy(model, tokenizer, eos: int, image_token: int, example: Example) -> str:
    """Greedy decoding with the inputs the hf engine gives the model."""
    model.eval()
    ids = torch.tensor([example.prompt])  # [1, prompt]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             mm_token_type_ids=(ids == image_token).int(), pixel_values=example.pixels["pixel_values"],
                             image_grid_thw=example.pixels["image_grid_thw"], max_new_tokens=len(example.target) + 4,
                             do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    new = out[0, len(example.prompt):].tolist()
    return tokenizer.decode(new[: new.index(eos)] if eos in new else new, skip_special_tokens=True)
