"""Digits 0-9 rendered from a font with random handwriting-like jitter: a labelled public set made by code.

No download and no private data: each image is drawn with Pillow from a TrueType font (by default
the one Pillow ships, Aileron Regular, so every machine renders the same set), then jittered by a
random thickness (stroke width), rotation, shear, horizontal squeeze and a smooth elastic warp, and
framed as MNIST's published construction frames its digits (LeCun et al.: the digit scaled to fit a
20x20 box, preserving its aspect ratio, and placed in 28x28 by its centre of mass). White on black in
[-1, 1], at any (C, H, W) (the 20/28 box scales with the side; grey is repeated to C channels).

Why by hand: no library we use renders labelled digit images; Pillow draws the glyph and torch warps it.

Image ``i`` has label ``i % 10`` (balanced classes) and comes from ``numpy.random.default_rng((seed, i))``,
so it depends only on (seed, i, the options, the image shape): the same in every DataLoader worker and epoch.
A drawn image is kept (one grey plane per image: 63 MB for 20,000 at 28x28), so later epochs do not draw
again (about 1.7 ms an image on one CPU thread).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from dp_diffusion.config import ConfigError
from dp_diffusion.data.synthetic import checked_index

NUM_CLASSES = 10
MNIST_BOX = 20 / 28  # MNIST: the digit fitted in a 20x20 box of the 28x28 image
SUPERSAMPLE = 4  # the glyph is drawn and warped at this multiple of the output side, then shrunk (antialiased)
INK = 0.1  # a pixel with more ink than this (of 1) belongs to the digit's bounding box


class FontDigits(Dataset):
    """``size`` rendered digit images as ``(image float32 (C, H, W) in [-1, 1], label int)``; label ``i % 10``.

    Options (the jitter ranges; each draw uniform):
    ``fonts``: TrueType files to pick from per image (empty: Pillow's bundled font);
    ``stroke``: (min, max) extra stroke width as a fraction of the glyph height (thickness);
    ``rotation``: max absolute rotation in degrees; ``shear``: max absolute horizontal shear;
    ``squeeze``: (min, max) horizontal scale; ``elastic``: displacement std of the smooth warp,
    as a fraction of the image side.
    """

    num_classes = NUM_CLASSES

    def __init__(
        self,
        size: int = 20_000,
        image_shape: Sequence[int] = (1, 28, 28),
        seed: int = 0,
        *,
        fonts: Sequence[str] = (),
        stroke: Sequence[float] = (0.0, 0.08),
        rotation: float = 15.0,
        shear: float = 0.35,
        squeeze: Sequence[float] = (0.7, 1.15),
        elastic: float = 0.02,
    ) -> None:
        if size < 1:
            raise ConfigError(f"font_digits: size must be >= 1, got {size}")
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sides, got {tuple(image_shape)}")
        for name, (low, high) in {"stroke": stroke, "squeeze": squeeze}.items():
            if not 0 <= low <= high:
                raise ConfigError(f"font_digits: {name} must be [min, max] with 0 <= min <= max, got {[low, high]}")
        if squeeze[0] <= 0:
            raise ConfigError(f"font_digits: squeeze must be > 0, got {list(squeeze)}")
        for name, value in {"rotation": rotation, "shear": shear, "elastic": elastic}.items():
            if value < 0:
                raise ConfigError(f"font_digits: {name} must be >= 0, got {value}")
        missing = [f for f in fonts if not Path(f).expanduser().is_file()]
        if missing:
            raise ConfigError(f"font_digits: font file not found: {missing[0]}")
        self.size = int(size)
        self.image_shape = tuple(int(d) for d in image_shape)
        self.seed = int(seed)
        self.fonts = [str(Path(f).expanduser()) for f in fonts]
        self.stroke = (float(stroke[0]), float(stroke[1]))
        self.rotation, self.shear, self.elastic = float(rotation), float(shear), float(elastic)
        self.squeeze = (float(squeeze[0]), float(squeeze[1]))
        self.canvas = SUPERSAMPLE * max(self.image_shape[1:])
        self._font_cache: dict[tuple[int, int], ImageFont.FreeTypeFont] = {}
        self._drawn: dict[int, torch.Tensor] = {}  # index -> grey (H, W) in [-1, 1]

    def __getstate__(self) -> dict:
        # Loaded fonts stay behind: Pillow's bundled font, read from bytes, does not unpickle (DataLoader
        # workers started by spawn receive the data set pickled); each process loads its own.
        return {**self.__dict__, "_font_cache": {}}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = checked_index(index, self.size, "font digits")
        label = index % NUM_CLASSES
        if index not in self._drawn:
            rng = np.random.default_rng((self.seed, index))
            self._drawn[index] = self._frame(self._warp(self._draw(label, rng), rng))
        return self._drawn[index].expand(self.image_shape).clone(), label

    def _font(self, which: int, pixels: int) -> ImageFont.FreeTypeFont:
        key = (which, pixels)
        if key not in self._font_cache:
            self._font_cache[key] = (
                ImageFont.truetype(self.fonts[which], pixels) if self.fonts else ImageFont.load_default(size=pixels)
            )
        return self._font_cache[key]

    def _draw(self, digit: int, rng: np.random.Generator) -> Image.Image:
        """The digit drawn white on black, centred in the supersampled canvas, with a random stroke width."""
        side = self.canvas
        pixels = int(side * 0.7)  # glyph height ~ 70 % of the canvas leaves room for rotation and shear
        font = self._font(int(rng.integers(len(self.fonts))) if self.fonts else 0, pixels)
        stroke = int(round(rng.uniform(*self.stroke) * pixels))
        image = Image.new("L", (side, side), 0)
        ImageDraw.Draw(image).text(
            (side / 2, side / 2), str(digit), fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255
        )
        return image

    def _warp(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        """Rotation x shear x squeeze about the centre, then a smooth elastic displacement; (S, S) in [0, 1]."""
        angle = np.deg2rad(rng.uniform(-self.rotation, self.rotation))
        cos, sin = np.cos(angle), np.sin(angle)
        forward = (
            np.array([[cos, -sin], [sin, cos]])
            @ np.array([[1.0, rng.uniform(-self.shear, self.shear)], [0.0, 1.0]])
            @ np.diag([rng.uniform(*self.squeeze), 1.0])
        )
        inverse = np.linalg.inv(forward)  # PIL maps each output pixel back to its input position
        centre = np.full(2, image.width / 2)
        shift = centre - inverse @ centre
        coeffs = (inverse[0, 0], inverse[0, 1], shift[0], inverse[1, 0], inverse[1, 1], shift[1])
        image = image.transform(image.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
        glyph = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None, None]
        if self.elastic > 0:  # a 4x4 grid of random displacements, bicubically smoothed over the image
            coarse = torch.from_numpy(rng.standard_normal((1, 2, 4, 4)).astype(np.float32)) * (2 * self.elastic)
            side = glyph.shape[-1]
            field = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
            axis = torch.linspace(-1, 1, side)
            ys, xs = torch.meshgrid(axis, axis, indexing="ij")
            glyph = F.grid_sample(glyph, torch.stack([xs, ys], -1)[None] + field, align_corners=True)
        return glyph[0, 0].clamp(0, 1)

    def _frame(self, glyph: torch.Tensor) -> torch.Tensor:
        """MNIST's framing: crop to the ink, fit the box keeping the aspect ratio, centre of mass to the centre."""
        _, height, width = self.image_shape
        rows, cols = torch.nonzero(glyph > INK, as_tuple=True)
        if len(rows):
            glyph = glyph[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        box_h, box_w = max(1, round(height * MNIST_BOX)), max(1, round(width * MNIST_BOX))
        scale = min(box_h / glyph.shape[0], box_w / glyph.shape[1])
        new_h, new_w = max(1, round(glyph.shape[0] * scale)), max(1, round(glyph.shape[1] * scale))
        glyph = F.interpolate(glyph[None, None], size=(new_h, new_w), mode="bilinear", antialias=True,
                              align_corners=False)[0, 0].clamp(0, 1)
        mass = glyph.sum().clamp_min(1e-8)
        centre_y = float((glyph.sum(1) * torch.arange(new_h)).sum() / mass) + 0.5
        centre_x = float((glyph.sum(0) * torch.arange(new_w)).sum() / mass) + 0.5
        top = min(max(round(height / 2 - centre_y), 0), height - new_h)
        left = min(max(round(width / 2 - centre_x), 0), width - new_w)
        image = torch.zeros(height, width)
        image[top : top + new_h, left : left + new_w] = glyph
        return image * 2 - 1
