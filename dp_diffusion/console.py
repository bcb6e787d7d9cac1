"""Lines a run prints for its user: once per run, not once per DDP rank."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_only

__all__ = ["announce"]


def announce(message: str) -> None:
    """Print `message` (flushed) on DDP rank 0 only: every rank runs the same code, the user reads it once."""
    if rank_zero_only.rank == 0:
        print(message, flush=True)
