"""The queue's make-up as policies read it: groups by adapter, rows of the next iteration, work left, deadlines."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from engine.orchestrator.cost import Composition, CostModel, Load
from engine.orchestrator.state import MergeState
from engine.sequence import Sequence


def group(seq: Sequence, state: MergeState) -> str | None:
    """The plain adapter whose merged weights could serve ``seq``; None for base rows and non-mergeable adapters."""
    return seq.adapter if state.mergeable(seq.adapter) else None


def prefill_left(seq: Sequence) -> int:
    """Tokens still to prefill (prompt, or prompt + outputs after a preemption)."""
    return seq.remaining if seq.in_prefill else 0


def decode_left(seq: Sequence) -> int:
    """Tokens still to generate (a task head generates none)."""
    return 0 if seq.head is not None else max(seq.max_tokens - seq.num_output, 0)


def iterations_left(seq: Sequence) -> int:
    """Iterations the sequence still needs: one for the rest of its prefill (if any), one per new token after it."""
    return (1 if prefill_left(seq) else 0) + max(decode_left(seq) - (1 if prefill_left(seq) else 0), 0)


def deadline(seq: Sequence, slo_s: float) -> float:
    """The request's deadline, or ``created_at + slo_s`` when it carries none."""
    req = seq.request
    return req.deadline if req.deadline is not None else req.created_at + slo_s


def service_s(seq: Sequence, cost: CostModel, lora_step_s: float) -> float:
    """Seconds the sequence needs once it runs every iteration: its prefill, then one iteration per token."""
    prefill = prefill_left(seq)
    return ((cost.prefill_base_s + prefill * cost.prefill_token_s if prefill else 0.0)
            + decode_left(seq) * (cost.decode_step_s + lora_step_s))


def rows_and_iterations(seq: Sequence, budget: int) -> tuple[int, int]:
    """(rows_next, iterations_left) in one pass over the sequence's fields (policies call this per request)."""
    tokens, computed, prompt = len(seq.token_ids), seq.num_computed, len(seq.prompt_ids)
    remaining = tokens - computed
    prefill = remaining if remaining > 1 or computed < prompt else 0
    decode = 0 if seq.head is not None else max(seq.max_tokens - (tokens - prompt), 0)
    iterations = (1 if prefill else 0) + max(decode - (1 if prefill else 0), 0)
    return (min(prefill, budget) if prefill else 1), iterations


def rows_next(seq: Sequence, budget: int) -> int:
    """Input rows the sequence adds to an iteration (its prefill chunk, or one decode row)."""
    return min(seq.remaining, budget) if seq.in_prefill else 1


def composition(seqs: Iterable[Sequence], state: MergeState, rank_of: Callable[[str], int],
                budget: int) -> Composition:
    """Rows per group if ``seqs`` all ran in one iteration (prefill chunks capped by the token budget)."""
    tokens: Counter[str | None] = Counter()
    for seq in seqs:
        tokens[group(seq, state)] += rows_next(seq, budget)
    return {g: Load(n, rank_of(g) if g is not None else 0) for g, n in tokens.items()}


def counts(seqs: Iterable[Sequence], state: MergeState) -> Counter[str | None]:
    return Counter(group(seq, state) for seq in seqs)
