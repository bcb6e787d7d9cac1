"""font_digits: digits rendered from a font with jitter (data/font_digits.py), a labelled public set made by code."""

from __future__ import annotations

import pickle
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

from dp_diffusion.config import ConfigError
from dp_diffusion.data import dataset_info
from dp_diffusion.data.font_digits import MNIST_BOX, FontDigits
from dp_diffusion.data.public import load_public, validate_public

INK = -0.8  # a pixel brighter than this (of [-1, 1]) is ink


def ink_box(image: torch.Tensor) -> tuple[int, int]:
    rows, cols = torch.nonzero(image[0] > INK, as_tuple=True)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def test_image_depends_only_on_seed_and_index() -> None:
    data = FontDigits(size=30, seed=3)
    first, label = data[17]
    data[4], data[29]  # other draws in between: no state carries over
    again, _ = data[17]
    assert torch.equal(first, again) and label == 7
    again[0, 0, 0] = 5.0  # a returned image is the caller's: changing it leaves the kept drawing as it was
    assert torch.equal(data[17][0], first)
    assert torch.equal(FontDigits(size=30, seed=3)[17][0], first)
    assert not torch.equal(FontDigits(size=30, seed=4)[17][0], first)
    assert not torch.equal(data[27][0], first)  # the same digit, another draw of the jitter


def test_negative_index_counts_from_the_end_and_outside_is_index_error() -> None:
    data = FontDigits(size=12)
    assert torch.equal(data[-1][0], data[11][0]) and data[-1][1] == 1
    with pytest.raises(IndexError, match="index 12 out of range for 12 font digits"):
        data[12]


def test_labels_are_balanced_and_images_are_white_digits_on_black() -> None:
    data = FontDigits(size=40, seed=0)
    images = torch.stack([data[i][0] for i in range(40)])
    labels = [data[i][1] for i in range(40)]
    assert labels == [i % 10 for i in range(40)] and len(data) == 40
    assert images.shape == (40, 1, 28, 28) and images.dtype == torch.float32
    assert images.min() == -1 and images.max() <= 1 and images.max() > 0.9
    border = torch.cat([images[..., :2, :].flatten(1), images[..., -2:, :].flatten(1)], 1)
    assert torch.all(border == -1)  # the 20x20 box leaves the frame black, as MNIST does
    ink = (images > INK).float().mean(dim=(1, 2, 3))
    assert 0.05 < ink.mean() < 0.4
    widths = torch.tensor([ink_box(image)[1] for image in images], dtype=torch.float32)
    assert widths.reshape(4, 10).mean(0).argmin() == 1  # the label is the digit drawn: a one is the narrowest


def test_framed_as_mnist_box_and_centre_of_mass() -> None:
    data = FontDigits(size=20, seed=1)
    side = round(28 * MNIST_BOX)
    for i in range(20):
        image = data[i][0][0]
        height, width = ink_box(data[i][0])
        assert max(height, width) in (side - 1, side, side + 1) and min(height, width) <= side + 1
        mass = (image + 1).clamp_min(0)
        centre = [float((mass.sum(1 - axis) * torch.arange(28)).sum() / mass.sum()) + 0.5 for axis in (0, 1)]
        assert all(abs(c - 14) <= 1.0 for c in centre), (i, centre)


def test_other_shapes_scale_the_box_and_repeat_grey() -> None:
    image, _ = FontDigits(size=5, image_shape=(3, 32, 32), seed=0)[2]
    assert image.shape == (3, 32, 32)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    assert max(ink_box(image)) in range(round(32 * MNIST_BOX) - 1, round(32 * MNIST_BOX) + 2)


def test_jitter_options_change_the_images() -> None:
    plain = FontDigits(size=10, seed=0, stroke=(0, 0), rotation=0, shear=0, squeeze=(1, 1), elastic=0)
    # no jitter: every draw of a digit is the same image, whatever the seed and index
    other_draw = FontDigits(size=20, seed=9, stroke=(0, 0), rotation=0, shear=0, squeeze=(1, 1), elastic=0)[13][0]
    assert torch.equal(plain[3][0], other_draw)
    assert not torch.equal(FontDigits(size=10, seed=0)[3][0], FontDigits(size=20, seed=9)[13][0])
    thick = FontDigits(size=10, seed=0, stroke=(0.1, 0.1), rotation=0, shear=0, squeeze=(1, 1), elastic=0)
    ink = lambda d: float((torch.stack([d[i][0] for i in range(10)]) > INK).float().mean())  # noqa: E731
    assert ink(thick) > 1.3 * ink(plain)


def test_pickles_after_use_for_spawned_workers() -> None:
    data = FontDigits(size=5)
    image = data[1][0]  # loads the bundled font, which does not unpickle itself
    assert torch.equal(pickle.loads(pickle.dumps(data))[1][0], image)


def test_a_font_file_is_used() -> None:
    dejavu = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    options = dict(stroke=(0, 0), rotation=0, shear=0, squeeze=(1, 1), elastic=0)
    bundled = FontDigits(size=10, seed=0, **options)[4][0]
    other = FontDigits(size=10, seed=0, fonts=[str(dejavu)], **options)[4][0]
    assert other.shape == bundled.shape and not torch.equal(other, bundled)


@pytest.mark.parametrize(
    "options, says",
    [
        ({"stroke": (0.2, 0.1)}, "stroke must be [min, max] with 0 <= min <= max"),
        ({"squeeze": (0, 1)}, "squeeze must be > 0"),
        ({"rotation": -1}, "rotation must be >= 0, got -1"),
        ({"fonts": ["/nowhere/font.ttf"]}, "font file not found: /nowhere/font.ttf"),
        ({"size": 0}, "size must be >= 1, got 0"),
    ],
)
def test_bad_options_are_config_errors(options: dict, says: str) -> None:
    with pytest.raises(ConfigError, match="font_digits: ") as excinfo:
        FontDigits(**options)
    assert says in str(excinfo.value)


def test_public_set_for_mnist_labelled_or_not() -> None:
    info = dataset_info("mnist5k")
    spec = validate_public({"name": "font_digits"}, info)
    assert spec == {"name": "font_digits", "size": 20_000, "seed": 0, "labels": True, "family_kwargs": {}}
    public = load_public({"name": "font_digits", "size": 12, "family_kwargs": {"rotation": 5}}, info)
    assert public.conditional and public.num_classes == 10 and len(public) == 12
    image, label = public[11]
    assert image.shape == (1, 28, 28) and label.dtype == torch.int64 and int(label) == 1
    unlabelled = load_public({"name": "font_digits", "size": 12, "labels": False, "family_kwargs": {"rotation": 5}},
                             info)
    assert not unlabelled.conditional and int(unlabelled[11][1]) == 0
    assert torch.equal(unlabelled[11][0], image)


def test_unknown_option_is_one_line() -> None:
    with pytest.raises(ConfigError, match="public.family_kwargs for font_digits: .*'slant'") as excinfo:
        load_public({"name": "font_digits", "family_kwargs": {"slant": 1}}, dataset_info("mnist5k"))
    assert "\n" not in str(excinfo.value)


def test_nothing_random_outside_its_generator() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    before = (torch.rand(1), np.random.rand())
    torch.manual_seed(0)
    np.random.seed(0)
    FontDigits(size=3)[1]
    assert (torch.rand(1), np.random.rand()) == before
