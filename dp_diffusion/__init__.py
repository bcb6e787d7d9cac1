"""dp-diffusion: differentially private diffusion models on one shared privacy core."""

__version__ = "0.1.0"
