"""ModePolicy: which inference mode (and merged adapter) each iteration runs in; an ABC plus a registry.

Modes: ``unmerged`` (base weights; every adapter through the multi-LoRA op), ``merged`` (adapter M folded into
the weights; only M's requests run, at no LoRA cost) and ``mixture`` (M folded in; every other row computes
x·ΔW_X − x·ΔW_M in the same multi-LoRA launch, rows with no plain adapter −x·ΔW_M alone). The engine keeps the
weights in the state the decision names (switching them with one swift-merge launch when it changes), and never
schedules the sequences the decision holds back.
"""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from engine.orchestrator.cost import CostModel
from engine.orchestrator.state import MergeState
from engine.sequence import Sequence

logger = logging.getLogger(__name__)

MODES = ("unmerged", "merged", "mixture")


@dataclass(frozen=True)
class ModeDecision:
    """The weights' state for the next iteration, and the sequences that sit it out.

    unmerged: ``merged_adapter`` is None. merged: the weights hold ``merged_adapter`` (None: the base model's
    own group) and ``held`` must cover every sequence of another group. mixture: ``merged_adapter`` is set.
    """

    mode: str = "unmerged"
    merged_adapter: str | None = None
    held: frozenset[int] = frozenset()  # seq ids the scheduler must not run this iteration

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; modes are {MODES}")
        if self.mode == "unmerged" and self.merged_adapter is not None:
            raise ValueError("unmerged mode cannot hold a merged adapter")
        if self.mode == "mixture" and self.merged_adapter is None:
            raise ValueError("mixture mode needs a merged adapter")

    def admits(self, seq: Sequence) -> bool:
        return seq.seq_id not in self.held


@dataclass(frozen=True)
class QueueView:
    """What a policy sees each iteration."""

    running: Seq[Sequence]
    waiting: Seq[Sequence]
    merged: str | None  # the adapter the weights hold now
    now: float  # unix time (virtual in simulations)


@dataclass
class PolicyContext:
    """What a policy may consult: the shared merge state, measured costs, ranks and the serving limits."""

    state: MergeState
    cost: CostModel | None  # measured at start-up for policies with ``needs_cost``
    rank_of: Callable[[str], int]
    slo_s: float = 10.0  # deadline of requests that carry none: created_at + slo_s
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    extra: dict = field(default_factory=dict)


class ModePolicy(ABC):
    """Chooses the mode of the next iteration from the queue's make-up (the orchestrator's hook)."""

    name: str = ""
    needs_cost: bool = False  # the engine measures a CostModel at start-up for it
    merges: bool = True  # whether it ever folds an adapter into the weights
    lora_backend: str | None = None  # a multi-LoRA backend the policy is defined by (kernels.backend name)

    def __init__(self, ctx: PolicyContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def decide(self, view: QueueView) -> ModeDecision:
        """Called once per iteration, before the batch is formed."""

    def keep(self, merged: str | None) -> ModeDecision:
        """Leave the weights as they are and hold nobody."""
        return ModeDecision() if merged is None else ModeDecision("mixture", merged)

    def while_loading(self, view: QueueView) -> ModeDecision:
        """The decided adapter's slot is not ready yet (its weights are loading): the weights stay as they are
        (``view.merged``) and, by default, everyone runs."""
        return self.keep(view.merged)


POLICIES: dict[str, type[ModePolicy]] = {}
POLICY_MODULES = {"valora": "engine.orchestrator.valora", "dlora": "engine.orchestrator.dlora",
                  "merged-only": "engine.orchestrator.merged_only"}


def register_policy(*names: str):
    def deco(cls: type[ModePolicy]) -> type[ModePolicy]:
        cls.name = names[0]
        for name in names:
            POLICIES[name] = cls
        return cls

    return deco


@register_policy("slora")
class UnmergedPolicy(ModePolicy):
    """``slora``: always unmerged (S-LoRA style); every adapter's update runs through the multi-LoRA op."""

    merges = False

    def decide(self, view: QueueView) -> ModeDecision:
        return ModeDecision()


@register_policy("punica")
class PunicaPolicy(UnmergedPolicy):
    """``punica``: always unmerged, on the kernels' "punica" backend (one fixed tile config for every shape)."""

    lora_backend = "punica"


def policy_class(name: str) -> type[ModePolicy]:
    """The policy class registered as ``name`` (importing its module on demand)."""
    if name not in POLICIES and name in POLICY_MODULES:
        importlib.import_module(POLICY_MODULES[name])
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; available: {sorted({*POLICIES, *POLICY_MODULES})}")
    return POLICIES[name]


def create_policy(name: str, ctx: PolicyContext, **params) -> ModePolicy:
    """A policy by registry name; ``params`` go to its constructor (its documented knobs)."""
    return policy_class(name)(ctx, **params)
