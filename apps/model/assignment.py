"""Minimum-cost bipartite assignment (the Hungarian algorithm), for matching predicted boxes to true ones."""

from __future__ import annotations

from collections.abc import Sequence

INF = float("inf")


def _assign_rows(cost: Sequence[Sequence[float]], n: int, m: int) -> list[int]:
    """Column of every row, n <= m; Kuhn-Munkres with potentials (shortest augmenting paths), O(n^2 m)."""
    u = [0.0] * (n + 1)  # row potentials (1-based; index 0 is the virtual root)
    v = [0.0] * (m + 1)  # column potentials
    owner = [0] * (m + 1)  # owner[j]: the row matched to column j, 0 when free
    way = [0] * (m + 1)  # previous column on the augmenting path
    for row in range(1, n + 1):
        owner[0], j0 = row, 0
        min_slack, used = [INF] * (m + 1), [False] * (m + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = owner[j0], INF, 0
            for j in range(1, m + 1):
                if used[j]:
                    continue
                slack = cost[i0 - 1][j - 1] - u[i0] - v[j]
                if slack < min_slack[j]:
                    min_slack[j], way[j] = slack, j0
                if min_slack[j] < delta:
                    delta, j1 = min_slack[j], j
            for j in range(m + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    min_slack[j] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:  # flip the augmenting path
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    cols = [0] * n
    for j in range(1, m + 1):
        if owner[j]:
            cols[owner[j] - 1] = j - 1
    return cols


def assignment(cost: Sequence[Sequence[float]]) -> list[tuple[int, int]]:
    """(row, column) pairs of a minimum-cost matching that covers min(rows, columns) of them, sorted by row.

    cost: [rows][columns] of finite numbers (a list of lists, or anything indexable that way, e.g. a tensor's
    ``tolist()``).
    """
    n = len(cost)
    m = len(cost[0]) if n else 0
    if n == 0 or m == 0:
        return []
    if any(len(r) != m for r in cost):
        raise ValueError("cost must be a rectangular matrix")
    if n <= m:
        return [(i, j) for i, j in enumerate(_assign_rows(cost, n, m))]
    transposed = [[cost[i][j] for i in range(n)] for j in range(m)]
    return sorted((i, j) for j, i in enumerate(_assign_rows(transposed, m, n)))
