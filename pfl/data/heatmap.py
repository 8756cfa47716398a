"""Heatmaps of directions: 3-D unit vectors binned on an equirectangular grid and Gaussian-blurred.

A heatmap stands for the distribution of a set of directions (a viewer's head positions) without their order: the
label distribution FedGen's server keeps of each viewport-prediction client (:mod:`pfl.algorithms.fedgen`). The grid
has ``grain`` rows of latitude and ``2 * grain`` columns of longitude, so its cells are squares of ``180 / grain``
degrees on the equirectangular frame. A direction's longitude and latitude are TRACK's normalized Eulerian angles
(:func:`pfl.models.viewport.to_normalized_eulerian`: yaw in [0, 1) from the x axis, pitch in [0, 1] from the north
pole (0, 0, 1)); row ``floor(pitch * grain)``, column ``floor(yaw * 2 grain)``, the last row holding the south pole.

The blur (:func:`blur`) is a separable Gaussian in cells, truncated at ``ceil(3 sigma)`` cells and normalized to sum
1: circular in longitude, reflected at the poles in latitude (mass that would leave the grid past a pole folds back
into the rows it came from, at the same longitude, so the blur keeps the total mass). On the sphere a path over the
pole continues at the opposite longitude and the cells near the poles are smaller than those at the equator: neither
is modelled (a flat equirectangular blur, as an image blur of the frame would be).
"""

from __future__ import annotations

import functools
import math

import torch

from pfl.models.viewport import from_normalized_eulerian, to_normalized_eulerian


def cell_index(positions: torch.Tensor, grain: int) -> torch.Tensor:
    """The flat cell (row-major on the ``grain`` x ``2 grain`` grid) of each direction: (N, 3) -> int64 (N,), on the
    positions' device. Directions need not be normalized; the south pole falls in the last row."""
    yaw, pitch = to_normalized_eulerian(positions.double()).unbind(-1)
    rows = (pitch * grain).long().clamp(0, grain - 1)
    cols = (yaw * (2 * grain)).long().clamp(0, 2 * grain - 1)
    return rows * (2 * grain) + cols


def counts(positions: torch.Tensor, grain: int) -> torch.Tensor:
    """How many directions (N, 3) fall in each cell: float64 (grain, 2 grain) on the host."""
    flat = torch.bincount(cell_index(positions, grain).cpu(), minlength=2 * grain * grain)
    return flat.double().view(grain, 2 * grain)


@functools.cache  # the same few matrices for every client's heatmap
def _blur_matrix(n: int, sigma: float, circular: bool) -> torch.Tensor:
    """The (n, n) float64 matrix A of a 1-D truncated Gaussian blur, ``blurred = A @ values``: column j spreads cell
    j over the cells j - r .. j + r, r = ceil(3 sigma), with weights exp(-d^2 / (2 sigma^2)) normalized to sum 1;
    a cell past the ends wraps (``circular``) or is reflected back (-1 -> 0, n -> n - 1). Each column sums to 1."""
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-offsets.pow(2) / (2 * sigma ** 2))
    kernel /= kernel.sum()
    matrix = torch.zeros(n, n, dtype=torch.float64)
    for j in range(n):
        for d, k in zip(range(-radius, radius + 1), kernel):
            i = j + d
            if circular:
                i %= n
            while not 0 <= i < n:  # reflect (half-sample symmetric), as often as a wide kernel needs
                i = -i - 1 if i < 0 else 2 * n - i - 1
            matrix[i, j] += k
    return matrix


def blur(grid: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of a float64 (grain, 2 grain) grid with ``sigma`` in cells (module docstring); ``sigma=0``
    returns the grid unchanged. Keeps the total mass."""
    if sigma == 0:
        return grid
    rows, cols = grid.shape
    return _blur_matrix(rows, sigma, circular=False) @ grid @ _blur_matrix(cols, sigma, circular=True).T


def heatmap(positions: torch.Tensor, grain: int, sigma: float) -> torch.Tensor:
    """The blurred counts of directions (N, 3): float64 (grain, 2 grain) on the host, summing to N."""
    return blur(counts(positions, grain), sigma)


def sample(grid: torch.Tensor, n: int, rng: torch.Generator) -> torch.Tensor:
    """``n`` directions drawn from a heatmap: a cell with probability proportional to its mass, then a point uniform
    in the cell's (yaw, pitch) rectangle, as unit vectors float32 (n, 3) on the host. Draws cells
    (``torch.multinomial``) then the offsets (``torch.rand`` (n, 2), float64) from ``rng``.

    Raises:
        ValueError: the grid holds no mass.
    """
    rows, cols = grid.shape
    flat = grid.flatten()
    if not flat.sum() > 0:
        raise ValueError("cannot draw directions from an empty heatmap")
    cells = torch.multinomial(flat, n, replacement=True, generator=rng)
    offsets = torch.rand((n, 2), generator=rng, dtype=torch.float64)
    yaw = (cells % cols + offsets[:, 0]) / cols
    pitch = (cells // cols + offsets[:, 1]) / rows
    return from_normalized_eulerian(torch.stack([yaw, pitch], dim=1)).float()


def shares(grids: torch.Tensor) -> torch.Tensor:
    """Each grid's share of every cell's mass among U grids (U, H, W): float64 (H W, U), rows summing to 1 (0 where
    no grid has mass); the heatmap analogue of FedGen's label shares (:func:`pfl.algorithms.fedgen.label_weights`)."""
    flat = grids.double().flatten(1).T  # (HW, U)
    total = flat.sum(dim=1, keepdim=True)
    return torch.where(total > 0, flat / torch.where(total > 0, total, 1.0), 0.0)
