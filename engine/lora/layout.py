"""LoRALayout: which projections of the model adapters may target, and the shapes the slot pool gives them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRALayout:
    """Per decoder layer, the projection groups (fused on the output dim) and their slices."""

    num_layers: int
    groups: dict[str, tuple[int, tuple[int, ...]]]  # group -> (in_dim, output width of each slice)
    projections: dict[str, tuple[str, ...]]  # group -> PEFT module names of its slices, in order
    max_rank: int

    def slice_of(self, projection: str) -> tuple[str, int]:
        """(group, slice index) of a PEFT module name such as 'k_proj'."""
        for group, names in self.projections.items():
            if projection in names:
                return group, names.index(projection)
        raise KeyError(projection)

    def slice_bounds(self, group: str) -> tuple[int, ...]:
        bounds = [0]
        for width in self.groups[group][1]:
            bounds.append(bounds[-1] + width)
        return tuple(bounds)
