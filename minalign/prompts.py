"""The prompts of a loop run: the held-out split of the pool, and each round's draw from it."""
from __future__ import annotations

import random

from minalign.errors import ConfigError


def split_pool(pool: list[dict], eval_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(pool, held-out): eval_size rows held out at random (seeded), both in file order."""
    if eval_size >= len(pool):
        raise ConfigError(f"prompts.eval_size {eval_size} leaves no prompts of {len(pool)} to train on")
    held = set(random.Random(f"{seed}:eval").sample(range(len(pool)), eval_size))
    return [r for i, r in enumerate(pool) if i not in held], [r for i, r in enumerate(pool) if i in held]


def draw_prompts(pool: list[dict], per_round: int, by_source: bool, seed: int, k: int) -> list[dict]:
    """Round k's prompts: per_round of the pool (0 = all), uniformly or, with by_source, the same number from each
    "source" (a source with too few prompts gives all it has). Each group is walked in a seeded random order, round
    after round, so every prompt is used once before any is used again."""
    groups: dict[str, list[dict]] = {}
    for row in pool:
        groups.setdefault(str(row.get("source", "")) if by_source else "", []).append(row)
    names = sorted(groups)
    order = {g: random.Random(f"{seed}:{g}").sample(groups[g], len(groups[g])) for g in names}
    want = per_round or len(pool)

    def quotas(r: int) -> dict[str, int]:  # prompts from each group in round r; the remainder rotates
        base, extra = divmod(want, len(names))
        lucky = {names[(r * extra + j) % len(names)] for j in range(extra)}
        return {g: min(len(groups[g]), base + (g in lucky)) for g in names}

    out = []
    for g in names:
        start = sum(quotas(r)[g] for r in range(k))  # where round k continues this group's walk
        out += [order[g][(start + i) % len(order[g])] for i in range(quotas(k)[g])]
    return out
