"""Tumour regions: connected heatmap cells above a threshold, as polygons along the cells' edges.

The polygons follow the cell borders exactly (no smoothing), so a region's area
is its cells' area and every cell above the threshold lies inside one polygon.
A region is a 4-connected set of cells (cells touching only at a corner are two
regions). Inside a region, where two of its cells touch at a corner the outline
turns left, so the background pinched off there becomes a hole touching the
outline at that one point: every ring stays simple, a valid GeoJSON polygon
(RFC 7946 / OGC simple features) that QuPath and shapely accept.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Boundary edges of a cell, walked clockwise on screen (y down), interior on the right:
# (neighbour's row offset, col offset, start corner, end corner); corners are (col, row).
_SIDES = (
    (-1, 0, (0, 0), (1, 0)),  # top, heading east
    (0, 1, (1, 0), (1, 1)),  # right, heading south
    (1, 0, (1, 1), (0, 1)),  # bottom, heading west
    (0, -1, (0, 1), (0, 0)),  # left, heading north
)


def label_regions(above: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean (rows, cols) grid: (labels int32, count); 0 = none."""
    labels, n = ndimage.label(above)
    return labels.astype(np.int32), int(n)


def trace_rings(cells: np.ndarray) -> list[list[tuple[int, int]]]:
    """Closed rings (lists of (col, row) corner points, first == last) bounding the True cells.

    For one 4-connected component the first ring is its outline and the others its
    holes. Straight runs are merged, so a rectangle has 4 corners (5 points).
    """
    padded = np.pad(cells.astype(bool), 1)
    rows, cols = cells.shape
    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for dr, dc, start, end in _SIDES:
        neighbour = padded[1 + dr : 1 + dr + rows, 1 + dc : 1 + dc + cols]
        rr, cc = np.nonzero(padded[1:-1, 1:-1] & ~neighbour)
        for r, c in zip(rr.tolist(), cc.tolist()):
            outgoing.setdefault((c + start[0], r + start[1]), []).append((c + end[0], r + end[1]))
    rings = []
    while outgoing:
        # Start at a corner with one way out (never where two cells touch diagonally),
        # so that coming back to it closes the ring.
        first = min(p for p, ends in outgoing.items() if len(ends) == 1)
        ring = [first]
        point, previous = _take_edge(outgoing, first, first), first
        while point != first:
            ring.append(point)
            point, previous = _take_edge(outgoing, point, previous), point
        ring.append(first)
        rings.append(_merge_straight_runs(ring))
    outlines = [r for r in rings if _signed_area(r) > 0]
    holes = [r for r in rings if _signed_area(r) < 0]
    return outlines + holes


def _take_edge(outgoing: dict, point: tuple[int, int], previous: tuple[int, int]) -> tuple[int, int]:
    """Follow one unused edge out of `point`; where two leave it (cells touching at a corner), turn left."""
    ends = outgoing[point]
    if len(ends) == 1:
        end = ends.pop(0)
    else:
        heading = (point[0] - previous[0], point[1] - previous[1])
        left = (heading[1], -heading[0])  # on screen (y down), a left turn of (dx, dy)
        end = next(e for e in ends if (e[0] - point[0], e[1] - point[1]) == left)
        ends.remove(end)
    if not ends:
        del outgoing[point]
    return end


def _merge_straight_runs(ring: list[tuple[int, int]]) -> list[tuple[int, int]]:
    points = ring[:-1]
    corners = [p for i, p in enumerate(points)
               if _cross(points[i - 1], p, points[(i + 1) % len(points)]) != 0]
    return corners + corners[:1]


def _cross(a, b, c) -> int:
    return (b[0] - a[0]) * (c[1] - b[1]) - (b[1] - a[1]) * (c[0] - b[0])


def _signed_area(ring: list[tuple[int, int]]) -> float:
    """Shoelace area, positive for rings clockwise on screen (outlines), negative for holes."""
    x = np.array([p[0] for p in ring], float)
    y = np.array([p[1] for p in ring], float)
    return float((x[:-1] * y[1:] - x[1:] * y[:-1]).sum() / 2)
