"""MergeState: the engine-wide record of which plain LoRA adapter is folded into the base weights right now."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MergedAdapter:
    """An adapter folded into the base weights, and the pool slot its A/B live in (held while merged)."""

    name: str
    slot: int
    rank: int
    scale: float


@dataclass
class MergeState:
    """What the base weights hold, shared by everything that reads or changes them.

    Invariants: ``current`` is None exactly when every adapted weight is the checkpoint's base (up to the
    swift merge's stated rounding bound); while an adapter is merged, its pool slot is held by the orchestrator,
    so the A/B an unmerge subtracts are the ones the merge added.

    Other adapter types that fold weights into the same matrices (LoRA-Switch's merge-switch path) must
    ``claim`` the weights first: a claim succeeds only while no plain adapter is merged, and while it is held
    the orchestrator keeps plain adapters unmerged. Their requests are not plain-LoRA rows: add their adapter
    names to ``non_mergeable`` so that policies never pick them as the merged adapter (mixture mode gives such
    rows the -ΔM correction, like base rows).
    """

    current: MergedAdapter | None = None
    switches: int = 0  # weight switches (merge, unmerge or M1 -> M2) since start-up
    switch_s_total: float = 0.0  # seconds spent in them
    last_switch_s: float = 0.0
    claimed_by: str | None = None
    non_mergeable: set[str] = field(default_factory=set)

    @property
    def merged(self) -> str | None:
        """Name of the merged adapter, or None when the weights are the base model's."""
        return None if self.current is None else self.current.name

    @property
    def slot(self) -> int | None:
        return None if self.current is None else self.current.slot

    def mergeable(self, adapter: str | None) -> bool:
        """Whether requests of ``adapter`` can run on weights with ``adapter`` merged (plain LoRA adapters)."""
        return adapter is not None and adapter not in self.non_mergeable

    def claim(self, owner: str) -> bool:
        """Take the weights for another adapter type; False while a plain adapter is merged or another owns them."""
        if self.current is not None or self.claimed_by not in (None, owner):
            return False
        self.claimed_by = owner
        return True

    def release(self, owner: str) -> None:
        if self.claimed_by == owner:
            self.claimed_by = None

    def record(self, adapter: MergedAdapter | None, seconds: float) -> None:
        """A switch to ``adapter`` happened and took ``seconds``."""
        self.current = adapter
        self.switches += 1
        self.switch_s_total += seconds
        self.last_switch_s = seconds
