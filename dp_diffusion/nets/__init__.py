"""Networks: the DDPM++ UNet denoiser backbone."""

from dp_diffusion.nets.unet import AttnBlock, ResBlock, UNet, positional_embedding

__all__ = ["UNet", "ResBlock", "AttnBlock", "positional_embedding"]
