"""Programmatic synthetic images for DP-SynGen's coarse and cleaning stages.

No private data enters these images, so training on them costs no privacy
budget (DP-SynGen, arXiv 2412.09842, abstract). Two families:

* ``dead_leaves``: the "mixed" dead-leaves recipe of Baradad et al., "Learning
  to See by Looking at Noise" (NeurIPS 2021), as DP-SynGen uses it
  (reference notes §2.3).
* ``spectrum``: random-phase noise with a 1/f^alpha amplitude spectrum
  (Baradad et al.'s "statistical" images), optionally with correlated colour.

Every family is a function ``family(image_shape, rng, **kwargs)`` of a numpy
``Generator`` returning float32 (C, H, W) in [-1, 1]. :class:`SyntheticImages`
renders images on the fly, each index from its own generator seeded by
``(seed, index)``, so any DataLoader worker and any epoch sees the same image.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dp_diffusion.config import ConfigError

SHAPES = ("circle", "square", "oriented_square", "rectangle", "triangle", "quadrilateral")


# --- radius law ---------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _radius_law(rmin: float, rmax: float, alpha: float, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin values r_k = linspace(rmin, rmax, bins) and the CDF of p(r_k) ∝ r_k^-alpha."""
    if not 0 < rmin < rmax:
        raise ValueError(f"radii need 0 < rmin < rmax, got rmin={rmin}, rmax={rmax}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    values = np.linspace(rmin, rmax, bins)
    # Baradad et al. subtract rmax^-alpha from every weight, giving the largest
    # radius zero mass; at the defaults that moves 0.13 % of the probability
    # (total variation), so we keep the plain power law.
    cdf = np.cumsum(values**-alpha)
    cdf /= cdf[-1]
    values.flags.writeable = False
    cdf.flags.writeable = False
    return values, cdf


def _radii(u: np.ndarray, rmin: float, rmax: float, alpha: float, bins: int) -> np.ndarray:
    """Inverse CDF of the discretised power law at uniforms ``u``, as fractions of the resolution."""
    values, cdf = _radius_law(float(rmin), float(rmax), float(alpha), int(bins))
    index = np.minimum(np.searchsorted(cdf, u, side="right"), bins - 1)
    return values[index]


def sample_radii(
    n: int,
    resolution: float,
    rmin: float = 0.03,
    rmax: float = 1.0,
    alpha: float = 3.0,
    bins: int = 200,
    generator: np.random.Generator | torch.Generator | None = None,
) -> torch.Tensor:
    """``n`` leaf radii in pixels from the discretised power law p(r) ∝ r^-alpha.

    The support is ``bins`` equally spaced values in [rmin, rmax] x resolution
    (Baradad et al.: alpha = 3, [0.03, 1], 200 bins). ``generator`` may be a
    numpy or torch generator; None draws from torch's global generator.
    Returns float32 (n,).
    """
    if isinstance(generator, np.random.Generator):
        u = generator.random(n)
    else:
        u = torch.rand(n, generator=generator, dtype=torch.float64).numpy()
    return torch.from_numpy(_radii(u, rmin, rmax, alpha, bins) * resolution).to(torch.float32)


# --- dead leaves --------------------------------------------------------------

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma weights of R, G, B
# Corner angles of the axis-aligned square inscribed in the unit circle.
_SQUARE_ANGLES = (np.pi / 4 + np.arange(4) * (np.pi / 2))[:, None]
# Compare-exchange sorting networks on rows (faster than np.sort on many tiny rows).
_SORT_3 = ((0, 1), (1, 2), (0, 1))
_SORT_4 = ((0, 1), (2, 3), (0, 2), (1, 3), (1, 2))


def _sort_rows(rows: list[np.ndarray], network: tuple[tuple[int, int], ...]) -> list[np.ndarray]:
    rows = list(rows)
    for i, j in network:
        rows[i], rows[j] = np.minimum(rows[i], rows[j]), np.maximum(rows[i], rows[j])
    return rows


def _leaf_polygons(types: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Corner angles (4, K), increasing, of each leaf's polygon inscribed in its circle.

    As in Baradad et al. every shape fits in the circle of radius r: squares
    have side r*sqrt(2) (oriented ones a random rotation), rectangles corners
    at angles (a, pi-a, pi+a, 2pi-a) for a random aspect angle a, triangles
    and quadrilaterals 3 or 4 sorted uniform angles (a triangle repeats its
    last corner). Corners in increasing angle make a convex polygon whose
    inside lies left of every edge. ``u`` holds (4, K) uniforms.
    """
    rotation = u[0] * (np.pi / 2) * (types == SHAPES.index("oriented_square"))
    angles = _SQUARE_ANGLES + rotation
    a = u[0] * (np.pi / 2)
    rectangle = np.stack([a, np.pi - a, np.pi + a, 2 * np.pi - a])
    triangle = _sort_rows(list(u[:3] * (2 * np.pi)), _SORT_3)
    triangle = np.stack(triangle + triangle[-1:])
    free = np.stack(_sort_rows(list(u * (2 * np.pi)), _SORT_4))
    angles = np.where(types == SHAPES.index("rectangle"), rectangle, angles)
    angles = np.where(types == SHAPES.index("triangle"), triangle, angles)
    return np.where(types == SHAPES.index("quadrilateral"), free, angles)


def _rasterise(
    cx: np.ndarray,
    cy: np.ndarray,
    r: np.ndarray,
    is_circle: np.ndarray,
    angles: np.ndarray,
    height: int,
    width: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(leaf, flat pixel) pairs of every pixel centre inside every leaf.

    Pixel (i, j) has centre (j + 0.5, i + 0.5). Each leaf is tested only in a
    square window over its bounding box; leaves are grouped by window side
    (powers of two, at least 4) so each group is one vectorised comparison.
    Returns the pairs in no particular order.
    """
    need = np.floor(2 * r).astype(np.int64) + 1  # most pixel centres a 2r span can hold
    side = np.left_shift(1, np.ceil(np.log2(np.maximum(need, 4))).astype(np.int64))
    side = np.minimum(side, max(height, width))
    order = np.argsort(side, kind="stable")
    side, cx, cy, r, is_circle, angles = side[order], cx[order], cy[order], r[order], is_circle[order], angles[:, order]
    vx = cx + r * np.cos(angles)  # (4, K) polygon corners
    vy = cy + r * np.sin(angles)
    ex = vx[[1, 2, 3, 0]] - vx  # edge vectors
    ey = vy[[1, 2, 3, 0]] - vy
    # p is left of (or on) edge e iff cross(e, p - v) >= 0, i.e. ex*y + c >= ey*x.
    c = ey * vx - ex * vy
    x0 = np.ceil(cx - r - 0.5).astype(np.int64)
    y0 = np.ceil(cy - r - 0.5).astype(np.int64)
    sides, starts = np.unique(side, return_index=True)
    stops = np.append(starts[1:], len(side))
    leaves, pixels = [], []
    # Arrays are (window row, window column, leaf): the long leaf axis last
    # keeps numpy's inner loops long.
    for s, a, b in zip(sides.tolist(), starts.tolist(), stops.tolist()):
        g = slice(a, b)
        lx, ly = min(s, width), min(s, height)
        cols = np.arange(lx)[:, None] + np.clip(x0[g], 0, width - lx)  # (lx, k)
        rows = np.arange(ly)[:, None] + np.clip(y0[g], 0, height - ly)  # (ly, k)
        x = (cols + 0.5)[None]  # (1, lx, k) pixel centres
        y = (rows + 0.5)[:, None]  # (ly, 1, k)
        # Convex polygon: the pixel centre lies left of (or on) all four edges.
        inside = ex[0, g] * y + c[0, g] >= ey[0, g] * x
        for e in range(1, 4):
            inside &= ex[e, g] * y + c[e, g] >= ey[e, g] * x
        in_circle = (y - cy[g]) ** 2 + (x - cx[g]) ** 2 <= r[g] ** 2
        inside = np.where(is_circle[g], in_circle, inside)
        iy, ix, k = np.nonzero(inside)
        leaves.append(order[a + k])
        pixels.append(rows[iy, k] * width + cols[ix, k])
    return np.concatenate(leaves), np.concatenate(pixels)


def dead_leaves(
    image_shape: Sequence[int],
    rng: np.random.Generator,
    *,
    shapes: Sequence[str] = SHAPES,
    rmin: float = 0.03,
    rmax: float = 1.0,
    alpha: float = 3.0,
    bins: int = 200,
    max_leaves: int = 5000,
    supersample: int = 1,
    grey_from_rgb: bool = False,
    chunk: int = 1024,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """One dead-leaves image (Baradad et al. 2021, "mixed" recipe), float32 (C, H, W) in [-1, 1].

    Leaves of a type drawn uniformly from ``shapes``, a uniform colour (one
    grey value per leaf for C = 1, independent uniform channels otherwise), a
    uniform centre on the canvas and a radius from :func:`sample_radii`
    (resolution = min(H, W)) are stacked, each new leaf ON TOP of the earlier
    ones as in Baradad et al., until every pixel centre is painted or
    ``max_leaves`` leaves are down (pixels still bare then stay at -1, black).

    Departures from the reference script, which draws with OpenCV: centres
    and radii are continuous (it rounds them to whole pixels, radius >= 1) and
    a pixel is painted when its centre lies in the leaf. Grey images draw one
    uniform grey per leaf; ``grey_from_rgb`` instead takes the luma
    (ITU-R 601, as PIL's ``convert("L")``) of a uniform RGB colour, as
    grey-converting the colour images does.

    ``supersample`` > 1 renders at that many times the resolution and
    average-pools, anti-aliasing the edges (close to DP-SynGen rendering at
    128 and resizing to 28). ``chunk`` leaves are drawn and rasterised at a
    time; leaves past the covering one are discarded, so the image is that of
    the one-leaf-at-a-time process. With ``return_info`` also
    returns a dict: ``shapes`` (type name per leaf used), ``radii`` (pixels, at
    the rendered resolution), ``leaf_index`` ((sH, sW) index of the visible
    leaf, -1 for bare pixels), ``covered``.
    """
    channels, height, width = (int(d) for d in image_shape)
    shapes = (shapes,) if isinstance(shapes, str) else tuple(shapes)
    if not set(shapes) <= set(SHAPES) or not shapes:
        raise ValueError(f"dead_leaves shapes must be a non-empty subset of {list(SHAPES)}, got {list(shapes)}")
    if grey_from_rgb and channels != 1:
        raise ValueError(f"dead_leaves grey_from_rgb needs a 1-channel image_shape, got {channels} channels")
    if supersample < 1 or max_leaves < 1 or chunk < 1:
        raise ValueError(
            f"dead_leaves needs supersample, max_leaves, chunk >= 1, got {supersample}, {max_leaves}, {chunk}"
        )
    allowed = np.array([SHAPES.index(s) for s in shapes])
    height, width = height * supersample, width * supersample
    resolution = min(height, width)
    num_pixels = height * width

    types, colours, radii, leaf_parts, pixel_parts = [], [], [], [], []
    covered = np.zeros(num_pixels, dtype=bool)
    drawn = 0
    while drawn < max_leaves and not covered.all():
        k = min(chunk, max_leaves - drawn)
        t = allowed[rng.integers(0, len(allowed), k)]
        colour = rng.random((k, 3)) @ _LUMA[:, None] if grey_from_rgb else rng.random((k, channels))
        centre = rng.random((k, 2)) * (width, height)
        r = _radii(rng.random(k), rmin, rmax, alpha, bins) * resolution
        angles = _leaf_polygons(t, rng.random((4, k)))
        leaf, pixel = _rasterise(centre[:, 0], centre[:, 1], r, t == 0, angles, height, width)
        covered[pixel] = True
        types.append(t)
        colours.append(colour)
        radii.append(r)
        leaf_parts.append(leaf + drawn)
        pixel_parts.append(pixel)
        drawn += k
    leaf, pixel = np.concatenate(leaf_parts), np.concatenate(pixel_parts)

    # The process stops at the leaf that paints the last bare pixel: the
    # largest over pixels of the first leaf covering it.
    first = np.full(num_pixels, drawn, dtype=np.int64)
    np.minimum.at(first, pixel, leaf)
    used = int(first.max()) + 1 if covered.all() else drawn
    keep = leaf < used
    top = np.full(num_pixels, -1, dtype=np.int64)  # newest leaf over each pixel
    np.maximum.at(top, pixel[keep], leaf[keep])

    # Row -1 of the palette is the black background of bare pixels (top == -1).
    palette = np.concatenate([np.concatenate(colours)[:used] * 2 - 1, np.full((1, channels), -1.0)])
    image = palette[top].T.reshape(channels, height, width)
    if supersample > 1:  # average pool supersample x supersample blocks
        s = supersample
        image = image.reshape(channels, height // s, s, width // s, s).mean(axis=(2, 4))
    image = torch.from_numpy(image.astype(np.float32))
    if not return_info:
        return image
    info = {
        "shapes": [SHAPES[i] for i in np.concatenate(types)[:used]],
        "radii": np.concatenate(radii)[:used],
        "leaf_index": top.reshape(height, width),
        "covered": bool(covered.all()),
    }
    return image, info


# --- spectrum noise -----------------------------------------------------------


def spectrum_noise(
    image_shape: Sequence[int],
    rng: np.random.Generator,
    *,
    alpha_range: tuple[float, float] = (0.5, 2.5),
    mix_colours: bool = True,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """Random-phase noise with amplitude spectrum ∝ 1/f^alpha, float32 (C, H, W) in [-1, 1].

    alpha ~ U[alpha_range] once per image (Baradad et al.'s statistical
    "spectrum" images); the power spectrum then falls as f^(-2 alpha). Each
    channel is white Gaussian noise shaped in Fourier space; with
    ``mix_colours`` and C > 1 the channels are mixed by a random C x C matrix
    so colours correlate. The mean (DC) is removed and the image min-max
    scaled to [-1, 1]. With ``return_info`` also returns ``{"alpha": alpha}``.
    """
    channels, height, width = (int(d) for d in image_shape)
    lo, hi = alpha_range
    if not 0 <= lo <= hi:
        raise ValueError(f"spectrum alpha_range must satisfy 0 <= low <= high, got {alpha_range}")
    alpha = float(rng.uniform(lo, hi))
    fy = np.fft.fftfreq(height)[:, None] * height
    fx = np.fft.rfftfreq(width)[None, :] * width
    f = np.hypot(fy, fx)
    f[0, 0] = 1.0
    amplitude = f**-alpha
    amplitude[0, 0] = 0.0  # zero mean
    white = rng.standard_normal((channels, height, width))
    field = np.fft.irfft2(np.fft.rfft2(white) * amplitude, s=(height, width))
    if mix_colours and channels > 1:
        field = np.einsum("cd,dhw->chw", rng.standard_normal((channels, channels)), field)
    span = field.max() - field.min()
    image = 2 * (field - field.min()) / (span if span > 0 else 1.0) - 1
    image = torch.from_numpy(image.astype(np.float32)).clamp_(-1, 1)
    return (image, {"alpha": alpha}) if return_info else image


# --- data set -----------------------------------------------------------------


def checked_index(index: int, size: int, what: str) -> int:
    """``index`` of a data set of ``size`` items as 0..size-1 (negative counts from the end); IndexError outside."""
    index = int(index)
    if index < 0:
        index += size
    if not 0 <= index < size:
        raise IndexError(f"index {index} out of range for {size} {what}")
    return index


SYNTHETIC_FAMILIES: dict[str, Callable[..., Any]] = {
    "dead_leaves": dead_leaves,
    "spectrum": spectrum_noise,
}


class SyntheticImages(Dataset):
    """``size`` synthetic images rendered on access as ``(image, 0)`` (unconditional).

    Image ``i`` comes from ``numpy.random.default_rng((seed, i))``, so it
    depends only on (family, family_kwargs, image_shape, seed, i): the same in
    every DataLoader worker and every epoch. Nothing is stored. One image is
    rendered at construction so bad ``family_kwargs`` fail here, not mid-training.
    """

    def __init__(
        self,
        family: str = "dead_leaves",
        size: int = 100_000,
        image_shape: Sequence[int] = (1, 28, 28),
        seed: int = 0,
        **family_kwargs: Any,
    ) -> None:
        if family not in SYNTHETIC_FAMILIES:
            raise ConfigError(f"unknown synthetic family {family!r}; choose one of {sorted(SYNTHETIC_FAMILIES)}")
        if size < 1:
            raise ConfigError(f"synthetic data set size must be >= 1, got {size}")
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sides, got {tuple(image_shape)}")
        if seed < 0:
            raise ConfigError(f"synthetic seed must be >= 0, got {seed}")
        self.family = family
        self.size = int(size)
        self.image_shape = tuple(int(d) for d in image_shape)
        self.seed = int(seed)
        self.family_kwargs = dict(family_kwargs)
        self._render = SYNTHETIC_FAMILIES[family]
        options = [
            name
            for name, p in inspect.signature(self._render).parameters.items()
            if p.kind is p.KEYWORD_ONLY and name != "return_info"
        ]
        unknown = sorted(set(self.family_kwargs) - set(options))
        if unknown:
            raise ConfigError(f"bad arguments {unknown} for synthetic family {family!r}; it takes {options}")
        try:  # fail early on bad values, in one line
            self._render(self.image_shape, np.random.default_rng(0), **self.family_kwargs)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"synthetic family {family!r} with {self.family_kwargs}: {err}") from None

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = checked_index(index, self.size, "synthetic images")
        rng = np.random.default_rng((self.seed, index))
        return self._render(self.image_shape, rng, **self.family_kwargs), 0


def synthetic_dataset(
    family: str = "dead_leaves",
    size: int = 100_000,
    image_shape: Sequence[int] = (1, 28, 28),
    seed: int = 0,
    **kwargs: Any,
) -> SyntheticImages:
    """A :class:`SyntheticImages` of a registered family; ConfigError listing the families otherwise."""
    return SyntheticImages(family, size, image_shape, seed, **kwargs)
