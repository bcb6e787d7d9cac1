"""Synthetic image families (dead leaves, spectrum noise) and the on-the-fly data set."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from torch.utils.data import DataLoader

from dp_diffusion.data.synthetic import (
    SHAPES,
    SYNTHETIC_FAMILIES,
    SyntheticImages,
    _leaf_polygons,
    _rasterise,
    dead_leaves,
    sample_radii,
    spectrum_noise,
    synthetic_dataset,
)

FAMILIES = sorted(SYNTHETIC_FAMILIES)
SHAPES_CHW = [(1, 28, 28), (3, 32, 32), (1, 8, 8)]


# --- data set -----------------------------------------------------------------


def test_registry_lists_both_families() -> None:
    assert set(FAMILIES) == {"dead_leaves", "spectrum"}


@pytest.mark.parametrize("family", FAMILIES)
def test_image_depends_only_on_seed_and_index(family: str) -> None:
    data = SyntheticImages(family, size=50, image_shape=(1, 16, 16), seed=3)
    later, _ = data[7]
    for i in (9, 2):  # other indices first: no state carries over between calls
        data[i]
    again, _ = data[7]
    fresh, _ = SyntheticImages(family, size=50, image_shape=(1, 16, 16), seed=3)[7]
    assert torch.equal(later, again) and torch.equal(later, fresh)
    assert torch.equal(data[-1][0], data[49][0])
    assert not torch.equal(later, data[8][0])
    assert not torch.equal(later, SyntheticImages(family, size=50, image_shape=(1, 16, 16), seed=4)[7][0])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("image_shape", SHAPES_CHW)
def test_images_are_float32_chw_in_signed_unit_range(family: str, image_shape: tuple[int, int, int]) -> None:
    data = synthetic_dataset(family, size=10, image_shape=image_shape, seed=0)
    for i in range(3):
        image, label = data[i]
        assert image.dtype == torch.float32 and tuple(image.shape) == image_shape
        assert torch.isfinite(image).all()
        assert image.min() >= -1 and image.max() <= 1
        assert label == 0
    if image_shape[0] == 3:  # colour images use colour: channels differ
        assert not torch.equal(image[0], image[1]) and not torch.equal(image[1], image[2])


def test_dataloader_batches_unconditional_pairs() -> None:
    loader = DataLoader(SyntheticImages("dead_leaves", size=10, image_shape=(1, 8, 8)), batch_size=4)
    images, labels = next(iter(loader))
    assert images.shape == (4, 1, 8, 8) and labels.tolist() == [0, 0, 0, 0]
    assert len(loader.dataset) == 10


def test_workers_render_the_same_images() -> None:
    data = SyntheticImages("dead_leaves", size=8, image_shape=(1, 8, 8), seed=2)
    direct = torch.stack([data[i][0] for i in range(8)])
    loader = DataLoader(data, batch_size=2, num_workers=2, multiprocessing_context="fork")
    assert torch.equal(torch.cat([images for images, _ in loader]), direct)


def test_bad_arguments_raise_early() -> None:
    with pytest.raises(ValueError, match=r"unknown synthetic family 'fractal'.*dead_leaves.*spectrum"):
        synthetic_dataset("fractal", size=10)
    with pytest.raises(ValueError, match=r"bad arguments \['radius'\].*rmin"):
        SyntheticImages("dead_leaves", size=10, radius=3)
    with pytest.raises(ValueError, match="rmin"):
        SyntheticImages("dead_leaves", size=10, rmin=2.0)
    with pytest.raises(ValueError, match="shapes must be"):
        SyntheticImages("dead_leaves", size=10, shapes=("hexagon",))
    with pytest.raises(ValueError, match="size"):
        SyntheticImages("spectrum", size=0)
    with pytest.raises(IndexError):
        SyntheticImages("spectrum", size=5)[5]


# --- dead leaves --------------------------------------------------------------


@pytest.mark.parametrize("image_shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)])
def test_dead_leaves_cover_every_pixel(image_shape: tuple[int, int, int]) -> None:
    for seed in range(8):
        image, info = dead_leaves(image_shape, np.random.default_rng(seed), return_info=True)
        assert info["covered"]
        assert (info["leaf_index"] >= 0).all()  # no background pixel left
        assert info["leaf_index"].max() == len(info["shapes"]) - 1  # the covering leaf is the last one used
        assert len(info["shapes"]) < 5000


def test_dead_leaves_stop_at_the_leaf_cap() -> None:
    _, info = dead_leaves((1, 28, 28), np.random.default_rng(0), max_leaves=20, return_info=True)
    assert not info["covered"] and len(info["shapes"]) == 20
    assert (info["leaf_index"] == -1).any()


def test_dead_leaves_grey_is_one_value_per_leaf() -> None:
    image, info = dead_leaves((1, 16, 16), np.random.default_rng(1), return_info=True)
    index = torch.from_numpy(info["leaf_index"])
    for leaf in index.unique()[:20]:
        assert image[0][index == leaf].unique().numel() == 1
    grey, _ = dead_leaves((1, 16, 16), np.random.default_rng(1), grey_from_rgb=True, return_info=True)
    assert grey.shape == (1, 16, 16) and grey.min() >= -1 and grey.max() <= 1


def test_supersampling_keeps_shape_and_softens_edges() -> None:
    image = dead_leaves((1, 28, 28), np.random.default_rng(0), supersample=2)
    assert image.shape == (1, 28, 28) and image.min() >= -1 and image.max() <= 1
    _, info = dead_leaves((1, 28, 28), np.random.default_rng(0), supersample=2, return_info=True)
    assert info["leaf_index"].shape == (56, 56)
    # Pixels straddling an edge average two leaves, so more grey levels than leaves show.
    assert image.unique().numel() > np.unique(info["leaf_index"]).size


def test_shape_types_are_uniform() -> None:
    rng = np.random.default_rng(0)
    names = [s for _ in range(6) for s in dead_leaves((1, 28, 28), rng, return_info=True)[1]["shapes"]]
    counts = np.array([names.count(s) for s in SHAPES])
    assert counts.sum() > 3000
    assert scipy.stats.chisquare(counts).pvalue > 1e-3
    _, info = dead_leaves((1, 16, 16), rng, shapes="circle", return_info=True)
    assert set(info["shapes"]) == {"circle"}


def _even_odd_inside(x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray) -> np.ndarray:
    """Ray-crossing point-in-polygon test, independent of the half-plane test under test."""
    inside = np.zeros(np.broadcast(x, y).shape, dtype=bool)
    for i in range(len(vx)):
        j = (i + 1) % len(vx)
        if vy[i] == vy[j]:
            continue
        straddles = (vy[i] > y) != (vy[j] > y)
        x_cross = vx[i] + (y - vy[i]) * (vx[j] - vx[i]) / (vy[j] - vy[i])
        inside ^= straddles & (x < x_cross)
    return inside


def test_rasterised_leaves_match_a_brute_force_reference() -> None:
    rng = np.random.default_rng(5)
    height, width, k = 20, 24, 300
    types = rng.integers(0, len(SHAPES), k)
    cx, cy = rng.uniform(-3, width + 3, k), rng.uniform(-3, height + 3, k)  # some leaves hang off the canvas
    r = np.exp(rng.uniform(np.log(0.4), np.log(30), k))
    angles = _leaf_polygons(types, rng.random((4, k)))
    leaf, pixel = _rasterise(cx, cy, r, types == 0, angles, height, width)
    got = np.zeros((k, height * width), dtype=bool)
    got[leaf, pixel] = True

    y, x = np.mgrid[0:height, 0:width] + 0.5
    for i in range(k):
        if SHAPES[types[i]] == "circle":
            want = (x - cx[i]) ** 2 + (y - cy[i]) ** 2 <= r[i] ** 2
        else:
            vx, vy = cx[i] + r[i] * np.cos(angles[:, i]), cy[i] + r[i] * np.sin(angles[:, i])
            want = _even_odd_inside(x, y, vx, vy)
            if SHAPES[types[i]] == "square":  # axis-aligned, side r * sqrt(2)
                half = r[i] / np.sqrt(2)
                assert np.array_equal(want, (abs(x - cx[i]) <= half) & (abs(y - cy[i]) <= half))
        mismatch = got[i] != want.ravel()
        # Only pixel centres on an edge, up to float rounding, may differ.
        assert mismatch.sum() <= 1, (SHAPES[types[i]], mismatch.sum())


# --- radius law ---------------------------------------------------------------


def _bin_counts(radii: torch.Tensor, resolution: int, rmin: float, rmax: float, bins: int) -> np.ndarray:
    fractions = radii.double().numpy() / resolution
    step = (rmax - rmin) / (bins - 1)
    index = np.rint((fractions - rmin) / step).astype(np.int64)
    assert np.allclose(fractions, rmin + index * step, atol=1e-6)  # every radius is a bin value
    return np.bincount(index, minlength=bins)


@pytest.mark.parametrize("alpha", [3.0, 2.0])
def test_radii_follow_the_discretised_power_law(alpha: float) -> None:
    n, resolution, rmin, rmax, bins = 200_000, 28, 0.03, 1.0, 200
    radii = sample_radii(n, resolution, alpha=alpha, generator=np.random.default_rng(0))
    assert radii.dtype == torch.float32 and radii.shape == (n,)
    assert radii.min() >= rmin * resolution - 1e-4 and radii.max() <= rmax * resolution + 1e-4
    counts = _bin_counts(radii, resolution, rmin, rmax, bins)
    values = np.linspace(rmin, rmax, bins)
    p = values**-alpha / (values**-alpha).sum()

    # Chi-square goodness of fit, sparse tail bins (expected < 5) merged.
    dense = n * p >= 5
    observed, expected = counts[dense], n * p[dense]
    if not dense.all():
        observed, expected = np.append(observed, counts[~dense].sum()), np.append(expected, n * p[~dense].sum())
    assert scipy.stats.chisquare(observed, expected).pvalue > 1e-3
    # Kolmogorov-Smirnov distance within the DKW bound at level 1e-3.
    ks = np.abs(np.cumsum(counts) / n - np.cumsum(p)).max()
    assert ks < np.sqrt(np.log(2 / 1e-3) / (2 * n))
    # Log-log slope of the empirical density where bins hold enough samples.
    enough = counts >= 50
    slope = np.polyfit(np.log(values[enough]), np.log(counts[enough]), 1)[0]
    assert abs(slope + alpha) < 0.1


def test_sample_radii_accepts_torch_generators() -> None:
    first = sample_radii(1000, 32, generator=torch.Generator().manual_seed(1))
    again = sample_radii(1000, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    counts = _bin_counts(first, 32, 0.03, 1.0, 200)
    assert counts[0] == counts.max()  # the smallest radius is the most likely


# --- spectrum noise -----------------------------------------------------------


def _radial_power_slope(image: np.ndarray, f_lo: int = 3, f_hi: int = 24) -> float:
    """Slope of log power against log frequency, power averaged over rings of integer |f|."""
    height, width = image.shape
    power = np.abs(np.fft.fft2(image)) ** 2
    f = np.rint(np.hypot(*np.meshgrid(np.fft.fftfreq(height) * height, np.fft.fftfreq(width) * width, indexing="ij")))
    rings = np.arange(f_lo, f_hi + 1)
    mean_power = np.array([power[f == ring].mean() for ring in rings])
    return float(np.polyfit(np.log(rings), np.log(mean_power), 1)[0])


def test_spectrum_power_falls_as_f_to_minus_two_alpha() -> None:
    for seed in range(4):
        image, info = spectrum_noise((1, 64, 64), np.random.default_rng(seed), return_info=True)
        assert 0.5 <= info["alpha"] <= 2.5
        # Amplitude ∝ f^-alpha, so power ∝ f^(-2 alpha); min-max scaling leaves the slope alone.
        assert abs(-_radial_power_slope(image[0].numpy()) / 2 - info["alpha"]) < 0.25, info["alpha"]


def test_spectrum_colour_channels_share_the_slope() -> None:
    image, info = spectrum_noise((3, 64, 64), np.random.default_rng(7), return_info=True)
    assert image.min() == -1 and image.max() == 1
    for channel in image.numpy():
        assert abs(-_radial_power_slope(channel) / 2 - info["alpha"]) < 0.25
