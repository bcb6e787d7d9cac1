"""A run's checkpoints: where they live, how they are written (atomically) and read (safely).

Writing: each checkpoint goes to a file beside its target, is fsynced and then
renamed over the target, so a kill at any moment leaves either the old file or
the new one, never a truncated one. Lightning's own save writes through fsspec,
whose final move is a copy when `$TMPDIR` is on another file system.

Reading: every load (`resume=`, `sample`, `evaluate`) unpickles with
`weights_only=True`, which refuses any object but tensors, plain containers and
the types in `SAFE_GLOBALS`, so a checkpoint from elsewhere cannot run code; a
missing, truncated or foreign file is a one-line `CheckpointError` naming it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from dp_diffusion.build import CONFIG_KEY
from dp_diffusion.config import ConfigError

CHECKPOINT_DIR = "checkpoints"
INTERRUPTED = "interrupted.ckpt"
# Types beyond tensors, dicts, lists, tuples, str, bytes and numbers that our
# checkpoints hold. Today there are none: Lightning stores loop and callback
# state as dicts of numbers and strings, the privacy state is plain dicts (spec,
# plan, ledger history, settings), the privacy secret is bytes and generator
# states are uint8 tensors. A type added to a checkpoint goes here, or every load
# fails with an error that names it (tests/test_kill_resume.py loads real ones).
SAFE_GLOBALS: list[Any] = []
PARTIAL_SUFFIX = ".partial"


class CheckpointError(ConfigError):
    """A checkpoint file that is missing, unreadable or not one of ours."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0].split(". ")[0][:200]


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint at `path`, unpickled without running code from it, written by `dp-diffusion train`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (or is not a file)")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to unpickle means the same thing to the user
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a readable checkpoint (truncated, or not written by "
            f"`dp-diffusion train`): {_first_line(err)}"
        ) from None
    if not isinstance(state, dict) or CONFIG_KEY not in state:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was not written by `dp-diffusion train` (it has no stored run config)"
        )
    return state


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomically(checkpoint: dict[str, Any], path: str | Path) -> None:
    """torch.save `checkpoint` to `path` so that a kill never leaves a truncated `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)  # beside the target: the rename never crosses devices
    with open(partial, "wb") as fh:
        torch.save(checkpoint, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, path)
    _fsync_dir(path.parent)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with atomic saves and code-free loads.

    `preloaded` maps a path already read (and checked) by `read_checkpoint` to its
    contents, so a resume does not read a large checkpoint twice.
    """

    def __init__(self, preloaded: dict[str, dict[str, Any]] | None = None) -> None:
        self.preloaded = dict(preloaded or {})

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        save_atomically(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = "cpu", weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is always True here, whatever Lightning asks for.
        state = self.preloaded.pop(str(path), None)
        return state if state is not None else read_checkpoint(path, map_location=map_location)


def existing_checkpoints(run_dir: str | Path) -> list[Path]:
    """The `.ckpt` files in `run_dir`'s checkpoint folder (a partial write is not one)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    return sorted(folder.glob("*.ckpt")) if folder.is_dir() else []


def check_run_dir(run_dir: str | Path, resume: str | Path | None, overwrite: bool) -> None:
    """Refuse to train into a run directory that already holds checkpoints.

    Allowed: a fresh directory; `overwrite=true`; or resuming from a checkpoint of
    this very directory (the run continues in place). Anything else would mix two
    runs' checkpoints and, at worst, continue the wrong one.
    """
    found = existing_checkpoints(run_dir)
    folder = (Path(run_dir) / CHECKPOINT_DIR).resolve()
    in_place = resume is not None and Path(resume).resolve().parent == folder
    if found and overwrite and in_place:
        raise ConfigError(f"overwrite=true would delete the checkpoint resume={resume} continues from; drop one")
    if not found or overwrite or in_place:
        return
    names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
    raise ConfigError(
        f"run directory {str(run_dir)!r} already holds checkpoints ({names}); continue it with "
        f"resume={folder / resume_candidate(found).name}, choose another hydra.run.dir, or pass overwrite=true "
        "to replace them"
    )


def resume_candidate(paths: list[Path]) -> Path:
    """The checkpoint to continue from: the newer of interrupted.ckpt and last.ckpt, else the newest.

    final.ckpt is for release (it need not carry the privacy generators a resume continues).
    """
    preferred = [p for p in paths if p.name in (INTERRUPTED, "last.ckpt")]
    return max(preferred or paths, key=lambda p: p.stat().st_mtime)


def clear_checkpoints(run_dir: str | Path) -> list[Path]:
    """Delete the checkpoints (and partial writes) an earlier run left in `run_dir` (for overwrite=true)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    removed = [*existing_checkpoints(run_dir), *folder.glob("*" + PARTIAL_SUFFIX)] if folder.is_dir() else []
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed
