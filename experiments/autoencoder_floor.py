"""The floor a DP-LDM run's samples cannot pass: its public autoencoder's reconstructions of real images.

    python experiments/autoencoder_floor.py runs/.../checkpoints/final.ckpt --out runs/ae_floor
    dp-diffusion evaluate samples=runs/ae_floor/samples.npz data=mnist5k eval=quick

Encodes `--num` images of the run's data set (`--split` train or test), a uniformly random subset drawn
with `--seed` (a split may be ordered by class, as mnist5k's is: its first 2,000 train images are the digits
0-4 only), with the checkpoint's public encoder and decodes them; `samples.npz` and `samples_grid.png` in
`--out` hold them with their real labels. Scored as samples, their FID (and the accuracy of the evaluation's
classifiers trained on them) is what a perfect latent model would reach with this autoencoder.
Reading the private images here is an evaluation, outside the guarantee like every evaluation against
private data; nothing of it goes back into a run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dp_diffusion.checkpoints import CheckpointError
from dp_diffusion.config import ConfigError
from dp_diffusion.data import build_datamodule
from dp_diffusion.methods.dp_ldm import DPLDM
from dp_diffusion.sample import load_trained
from dp_diffusion.sampling import save_samples


def subset(size: int, num: int, seed: int) -> torch.Tensor:
    """Indices of `num` of `size` examples (all if fewer), drawn uniformly at random with `seed`, in the order
    drawn (so the written grid, the first images, mixes the classes too)."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:num]


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a DP-LDM checkpoint (final.ckpt or last.ckpt)")
    parser.add_argument("--out", type=Path, required=True, help="folder for samples.npz and samples_grid.png")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--num", type=int, default=2000, help="images to reconstruct (a random subset of the split)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random subset")
    args = parser.parse_args(argv)
    if args.num < 1:
        raise SystemExit("error: --num must be at least 1")
    try:
        module = load_trained(args.checkpoint)
    except (CheckpointError, ConfigError) as err:
        raise SystemExit(f"error: {err}") from None
    if not isinstance(module, DPLDM):
        raise SystemExit(f"error: {args.checkpoint} is a {type(module).__name__} checkpoint; this needs DP-LDM's")
    module.eval()
    datamodule = build_datamodule(**module.run_config.data, seed=0)
    datamodule.setup()
    images, labels = datamodule.train_tensors() if args.split == "train" else datamodule.test_tensors()
    chosen = subset(len(images), args.num, args.seed)
    images, labels = images[chosen], labels[chosen]
    written = save_samples(module.reconstruct(images), labels, args.out)
    print(f"{len(images)} {args.split} images reconstructed: {written['npz']} (score it with dp-diffusion evaluate)")
    return written


if __name__ == "__main__":
    main()
    sys.exit(0)
