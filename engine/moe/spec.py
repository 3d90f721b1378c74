"""The MoE-LoRA adapter format: adapter_config.json (peft_type "MOE_LORA") + adapter_model.safetensors.

Folder layout, next to PEFT adapters in the adapters directory (one sub-folder each)::

    adapter_config.json
        peft_type        "MOE_LORA" (what tells it from a PEFT LoRA adapter)
        format_version   1
        routing          "pregated" (LoRA-Switch), "per_layer" (MoLA / MixLoRA) or "block" (PESC, FFN only)
        num_experts      N experts per adapted linear (default 8)
        top_k            experts each token uses (default 2)
        r, lora_alpha    every expert's rank and alpha; scale = alpha / r (alpha / sqrt(r) with use_rslora)
        use_rslora       bool
        target_modules   projection names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
        num_layers       decoder layers of the base model (checked against it)
    adapter_model.safetensors
        layers.{l}.{self_attn|mlp}.{proj}.experts.lora_A   [N, r, in_dim]   every expert's A (PEFT's [r, in])
        layers.{l}.{self_attn|mlp}.{proj}.experts.lora_B   [N, out_dim, r]  every expert's B (PEFT's [out, r])
        router.weight                        [num_layers * N, hidden]   routing "pregated": row l * N + e is the
                                             logit of expert e of layer l, read from the input of layer 0's
                                             attention projections (the first adapted layer's input)
        layers.{l}.{site}.router.weight      [N, in_dim of site]        routing "per_layer": one router per
                                             projection group ("qkv", "o", "gate_up", "down") on its input;
                                             routing "block": site "gate_up" only, deciding gate/up/down

Gating (all schemes): top-k of the router's logits, gates = softmax over the k chosen logits (fp32).
Each token t of layer l then adds sum_j gate[t, j] * scale * (x A_e_j^T) B_e_j^T to every adapted projection.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from engine.adapter_store import CONFIG_FILE, MAX_RANK, WEIGHTS_FILE, AdapterError

MOE_PEFT_TYPE = "MOE_LORA"
FORMAT_VERSION = 1
ROUTINGS = ("pregated", "per_layer", "block")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Projection group of each projection (the engine fuses q/k/v and gate/up), and the router site of each group.
GROUP_OF = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up",
            "up_proj": "gate_up", "down_proj": "down"}
GROUPS = ("qkv", "o", "gate_up", "down")  # in forward order within a decoder layer
PREGATED_ROUTER = "router.weight"


def expert_key(layer: int, projection: str, part: str) -> str:
    """Tensor name of every expert's ``part`` ('A' or 'B') of one projection."""
    block = "mlp" if projection in FFN_PROJECTIONS else "self_attn"
    return f"layers.{layer}.{block}.{projection}.experts.lora_{part}"


def router_key(layer: int, site: str) -> str:
    """Tensor name of a per-layer / block router reading the input of group ``site`` of ``layer``."""
    return f"layers.{layer}.{site}.router.weight"


def router_sites(routing: str, groups: tuple[str, ...]) -> tuple[str, ...]:
    """The groups of a layer whose input feeds a router (pregated: none per layer; its router is global)."""
    if routing == "per_layer":
        return groups
    if routing == "block":
        return ("gate_up",)
    return ()


def site_of(routing: str, group: str) -> str:
    """The router site whose decision a group follows within its layer (pregated: the layer's global row)."""
    if routing == "block":
        return "gate_up"
    return group


@dataclass(frozen=True)
class MoESpec:
    """What a MoE-LoRA adapter's config says about it."""

    name: str
    path: Path
    routing: str
    num_experts: int
    top_k: int
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    num_layers: int

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def groups(self) -> tuple[str, ...]:
        """Projection groups the experts adapt, in forward order."""
        targeted = {GROUP_OF[p] for p in self.target_modules}
        return tuple(g for g in GROUPS if g in targeted)

    def to_config(self) -> dict:
        return {"peft_type": MOE_PEFT_TYPE, "format_version": FORMAT_VERSION, "routing": self.routing,
                "num_experts": self.num_experts, "top_k": self.top_k, "r": self.rank, "lora_alpha": self.alpha,
                "use_rslora": self.use_rslora, "target_modules": list(self.target_modules),
                "num_layers": self.num_layers}


def is_moe_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a MoE-LoRA adapter (its config names the MOE_LORA type)."""
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and cfg.get("peft_type") == MOE_PEFT_TYPE


def _int_field(cfg: dict, key: str, name: str, lo: int, hi: int, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise AdapterError(f"MoE adapter {name!r}: {key}={value!r} must be an integer in {lo}..{hi}")
    return value


def read_moe_spec(path: str | Path, name: str | None = None) -> MoESpec:
    """Validate a MoE-LoRA folder's config; AdapterError with the reason otherwise."""
    folder = Path(path)
    name = name or folder.name
    cfg_path = folder / CONFIG_FILE
    if not (folder / WEIGHTS_FILE).is_file():
        raise AdapterError(f"MoE adapter {name!r}: {folder / WEIGHTS_FILE} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"MoE adapter {name!r}: {CONFIG_FILE} is unreadable ({exc})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != MOE_PEFT_TYPE:
        raise AdapterError(f"adapter {name!r}: peft_type is not {MOE_PEFT_TYPE}")
    if cfg.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise AdapterError(f"MoE adapter {name!r}: format_version {cfg.get('format_version')!r} is not "
                           f"{FORMAT_VERSION}")
    routing = cfg.get("routing", "pregated")
    if routing not in ROUTINGS:
        raise AdapterError(f"MoE adapter {name!r}: routing {routing!r} is not one of {', '.join(ROUTINGS)}")
    experts = _int_field(cfg, "num_experts", name, 1, 64, 8)
    top_k = _int_field(cfg, "top_k", name, 1, experts, 2)
    rank = _int_field(cfg, "r", name, 1, MAX_RANK)
    alpha = cfg.get("lora_alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise AdapterError(f"MoE adapter {name!r}: lora_alpha={alpha!r} must be a positive number")
    targets = cfg.get("target_modules") or list(PROJECTIONS)
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = sorted(set(targets) - set(PROJECTIONS))
    if unknown or not targets:
        raise AdapterError(f"MoE adapter {name!r}: target_modules {targets} must name projections among "
                           f"{', '.join(PROJECTIONS)}")
    if routing == "block" and set(targets) - set(FFN_PROJECTIONS):
        raise AdapterError(f"MoE adapter {name!r}: block routing adapts the FFN only (gate/up/down_proj), "
                           f"not {sorted(set(targets) - set(FFN_PROJECTIONS))}")
    layers = _int_field(cfg, "num_layers", name, 1, 1024)
    return MoESpec(name=name, path=folder, routing=routing, num_experts=experts, top_k=top_k, rank=rank,
                   alpha=float(alpha), use_rslora=bool(cfg.get("use_rslora", False)),
                   target_modules=tuple(p for p in PROJECTIONS if p in targets), num_layers=layers)


def write_moe_config(folder: Path, spec: MoESpec) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(spec.to_config(), indent=2) + "\n")
