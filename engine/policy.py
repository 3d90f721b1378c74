"""ModePolicy: which inference mode (and merged adapter) each iteration runs in; an ABC plus a registry."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from engine.sequence import Sequence

logger = logging.getLogger(__name__)

MODES = ("unmerged", "merged", "mixture")


@dataclass(frozen=True)
class ModeDecision:
    """unmerged: every adapter through the multi-LoRA op; merged / mixture: ``merged_adapter`` folded in."""

    mode: str = "unmerged"
    merged_adapter: str | None = None


class ModePolicy(ABC):
    """Chooses the mode of the next iteration from the queue's make-up (the orchestrator's hook)."""

    @abstractmethod
    def decide(self, running: Seq[Sequence], waiting: Seq[Sequence]) -> ModeDecision:
        """Called once per iteration, before the batch is formed."""


POLICIES: dict[str, type[ModePolicy]] = {}
# Named in EngineConfig.policy but provided by the orchestrator work; until registered they run unmerged.
PLANNED = ("valora", "dlora", "merged-only")


def register_policy(*names: str):
    def deco(cls: type[ModePolicy]) -> type[ModePolicy]:
        for name in names:
            POLICIES[name] = cls
        return cls

    return deco


@register_policy("slora", "punica")
class UnmergedPolicy(ModePolicy):
    """Always unmerged (S-LoRA / Punica style): every adapter's update runs through the multi-LoRA op."""

    def decide(self, running: Seq[Sequence], waiting: Seq[Sequence]) -> ModeDecision:
        return ModeDecision()


def create_policy(name: str) -> tuple[str, ModePolicy]:
    """(effective policy name, policy) for ``name``."""
    if name in POLICIES:
        return name, POLICIES[name]()
    if name in PLANNED:
        logger.warning("policy %r is not registered in this build; running always-unmerged", name)
        return "slora", UnmergedPolicy()
    raise ValueError(f"unknown policy {name!r}; available: {sorted(POLICIES)}")
