"""Grid transformations: the primitives of the DSL program search.

Each primitive maps a grid [h, w] of colours to a new grid, or returns None where it does
not apply (nothing to crop, a size that does not divide). A few produce the marker colour
:data:`MARK` (10) for "cells selected by the rule"; only the search's final learned colour
map can turn it into an ARC colour, so a program that leaves a mark never matches.

Background is colour 0 throughout, as in almost every ARC task.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

__all__ = ["MARK", "PRIMITIVES", "components", "learn_colour_map"]

MARK = 10
Grid = np.ndarray
Primitive = Callable[[Grid], Grid | None]
_NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


@functools.lru_cache(maxsize=64)
def _neighbour_lists(h: int, w: int) -> tuple[tuple[int, ...], ...]:
    """For each flat cell index of an [h, w] grid, its 8 neighbours' flat indices."""
    return tuple(
        tuple(
            (r + dr) * w + c + dc for dr, dc in _NEIGHBOURS if 0 <= r + dr < h and 0 <= c + dc < w
        )
        for r in range(h)
        for c in range(w)
    )


@functools.lru_cache(maxsize=4096)
def _labels(shape: tuple[int, int], data: bytes, by_colour: bool) -> tuple[tuple[int, ...], ...]:
    """Flat cell indices of each object (flood fill over Python lists: indexing numpy
    scalars cell by cell was the search's hot spot). Cached: several primitives ask."""
    cells = np.frombuffer(data, dtype=np.int64).tolist()
    neighbours = _neighbour_lists(*shape)
    seen = [False] * len(cells)
    objects = []
    for start, colour in enumerate(cells):
        if not colour or seen[start]:
            continue
        seen[start], stack, members = True, [start], []
        while stack:
            i = stack.pop()
            members.append(i)
            for j in neighbours[i]:
                if not seen[j] and cells[j] and (not by_colour or cells[j] == colour):
                    seen[j] = True
                    stack.append(j)
        objects.append(tuple(members))
    return tuple(objects)


def components(grid: Grid, by_colour: bool = False) -> list[np.ndarray]:
    """8-connected objects of non-background cells; each a boolean mask [h, w]. With
    ``by_colour`` an object is one colour, else any non-zero colours touching."""
    grid = np.ascontiguousarray(grid, dtype=np.int64)
    masks = []
    for members in _labels(grid.shape, grid.tobytes(), by_colour):
        mask = np.zeros(grid.size, dtype=bool)
        mask[list(members)] = True
        masks.append(mask.reshape(grid.shape))
    return masks


def _crop(grid: Grid, mask: np.ndarray) -> Grid | None:
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return grid[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _pick_object(grid: Grid, largest: bool, by_colour: bool) -> Grid | None:
    objects = components(grid, by_colour)
    if len(objects) < 2:
        return None
    sizes = [int(m.sum()) for m in objects]
    target = max(sizes) if largest else min(sizes)
    if sizes.count(target) > 1:  # ambiguous: no unique object to pick
        return None
    mask = objects[sizes.index(target)]
    return _crop(np.where(mask, grid, 0), mask)


def _gravity(grid: Grid, k: int) -> Grid:
    """Non-background cells fall to the bottom after rotating by k quarter turns."""
    g = np.rot90(grid, k)
    out = np.zeros_like(g)
    for c in range(g.shape[1]):
        col = g[:, c][g[:, c] != 0]
        if col.size:
            out[-col.size :, c] = col
    return np.rot90(out, -k)


def _scale_down(grid: Grid, f: int) -> Grid | None:
    h, w = grid.shape
    if h % f or w % f or h == f and w == f:
        return None
    blocks = grid.reshape(h // f, f, w // f, f)
    small = blocks[:, 0, :, 0]
    if not (blocks == small[:, None, :, None]).all():
        return None
    return small


def _halves(grid: Grid, axis: int) -> tuple[Grid, Grid] | None:
    """The two halves along ``axis``, dropping a one-cell divider line if the size is odd."""
    n = grid.shape[axis]
    if n < 2:
        return None
    half = n // 2
    a = np.take(grid, range(half), axis=axis)
    b = np.take(grid, range(n - half, n), axis=axis)
    return a, b


def _logic(grid: Grid, axis: int, op: str) -> Grid | None:
    parts = _halves(grid, axis)
    if parts is None:
        return None
    a, b = parts[0] != 0, parts[1] != 0
    sel = {"and": a & b, "or": a | b, "xor": a ^ b, "nor": ~(a | b)}[op]
    return np.where(sel, MARK, 0)


def _fill_enclosed(grid: Grid) -> Grid | None:
    """Background cells not 4-connected to the border get the mark."""
    h, w = grid.shape
    if h < 3 or w < 3:
        return None
    # 0 -> 1 and non-zero -> 0, so the 8-connected "objects" of this grid are background
    # regions; a region is enclosed when it has no border cell. (8-connectivity lets a
    # region leak through diagonal gaps, as ARC's hole-filling tasks expect not to; we
    # accept that.)
    inverted = (grid == 0).astype(np.int64)
    holes = np.zeros((h, w), dtype=bool)
    for mask in components(inverted, by_colour=False):
        if not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()):
            holes |= mask
    return np.where(holes, MARK, grid) if holes.any() else None


def _symmetrise(grid: Grid, flip: Callable[[Grid], Grid]) -> Grid | None:
    """Fill background cells from their mirror image (symmetry completion)."""
    mirror = flip(grid)
    if mirror.shape != grid.shape:
        return None
    return np.where(grid == 0, mirror, grid)


def _majority_colour_mask(grid: Grid) -> Grid | None:
    colours, counts = np.unique(grid[grid != 0], return_counts=True)
    if colours.size < 2:
        return None
    return np.where(grid == colours[counts.argmax()], grid, 0)


PRIMITIVES: dict[str, Primitive] = {
    "rot90": lambda g: np.rot90(g, 1),
    "rot180": lambda g: np.rot90(g, 2),
    "rot270": lambda g: np.rot90(g, 3),
    "flip_ud": np.flipud,
    "flip_lr": np.fliplr,
    "transpose": lambda g: g.T,
    "antitranspose": lambda g: np.rot90(g, 2).T,
    "crop": lambda g: _crop(g, g != 0),
    "largest_object": lambda g: _pick_object(g, True, False),
    "smallest_object": lambda g: _pick_object(g, False, False),
    "largest_colour_object": lambda g: _pick_object(g, True, True),
    "smallest_colour_object": lambda g: _pick_object(g, False, True),
    "majority_colour": _majority_colour_mask,
    "tile2": lambda g: np.tile(g, (2, 2)) if max(g.shape) <= 15 else None,
    "tile3": lambda g: np.tile(g, (3, 3)) if max(g.shape) <= 10 else None,
    "self_tile": lambda g: np.kron(g != 0, g) if max(g.shape) <= 5 else None,
    "scale2": lambda g: np.kron(g, np.ones((2, 2), g.dtype)) if max(g.shape) <= 15 else None,
    "scale3": lambda g: np.kron(g, np.ones((3, 3), g.dtype)) if max(g.shape) <= 10 else None,
    "downscale2": lambda g: _scale_down(g, 2),
    "downscale3": lambda g: _scale_down(g, 3),
    "mirror_lr": lambda g: np.hstack([g, np.fliplr(g)]) if g.shape[1] <= 15 else None,
    "mirror_ud": lambda g: np.vstack([g, np.flipud(g)]) if g.shape[0] <= 15 else None,
    "left_half": lambda g: (_halves(g, 1) or (None,))[0],
    "top_half": lambda g: (_halves(g, 0) or (None,))[0],
    "gravity_down": lambda g: _gravity(g, 0),
    "gravity_up": lambda g: _gravity(g, 2),
    "gravity_left": lambda g: _gravity(g, 3),
    "gravity_right": lambda g: _gravity(g, 1),
    "sym_lr": lambda g: _symmetrise(g, np.fliplr),
    "sym_ud": lambda g: _symmetrise(g, np.flipud),
    "sym_transpose": lambda g: _symmetrise(g, np.transpose),
    "sym_rot180": lambda g: _symmetrise(g, lambda x: np.rot90(x, 2)),
    "fill_enclosed": _fill_enclosed,
    **{
        f"{op}_{side}": (lambda g, a=axis, o=op: _logic(g, a, o))
        for op in ("and", "or", "xor", "nor")
        for side, axis in (("lr", 1), ("ud", 0))
    },
}


def learn_colour_map(pairs: list[tuple[Grid, Grid]]) -> dict[int, int] | None:
    """The cell-wise colour map that sends every prediction to its target, if one exists
    (same shapes, each source colour always to one target colour); else None."""
    mapping: dict[int, int] = {}
    for pred, target in pairs:
        if pred.shape != target.shape:
            return None
        for src in np.unique(pred):
            dst = np.unique(target[pred == src])
            if dst.size != 1 or mapping.setdefault(int(src), int(dst[0])) != int(dst[0]):
                return None
    return mapping


def apply_colour_map(grid: Grid, mapping: dict[int, int]) -> Grid:
    """Map colours; colours the demos never showed keep their value."""
    lut = np.arange(MARK + 1)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut[grid]
