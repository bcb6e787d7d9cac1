"""Runs `dp-diffusion train` (the real CLI) and stops it at a chosen point, for the fault tests.

    KILL_AT=<kind>:<n> python tests/kill_points.py train <overrides...>

kind:
  step       SIGKILL inside the private step that brings the ledger to n steps (after the
             update, before Lightning's checkpoint of that step)
  write      SIGKILL partway through writing the n-th checkpoint file of this process
             (part of its bytes are on disk)
  written    SIGKILL right after the n-th checkpoint file of this process is in place
  interrupt  SIGINT (Ctrl-C) inside the private step that brings the ledger to n steps
  terminate  SIGTERM (a cluster's preemption) inside that step
"""

from __future__ import annotations

import builtins
import os
import signal
import sys
from typing import Any

PARTIAL_BYTES = 64 * 1024  # a kill mid-write leaves at least this much of the file on disk


def die(signum: int = signal.SIGKILL) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signum)


class DiesMidWrite:
    """A file object that writes part of what it is given, once past PARTIAL_BYTES, then SIGKILLs."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self._written = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self._written + len(view) >= PARTIAL_BYTES:
            self._fh.write(view[: max(PARTIAL_BYTES - self._written, len(view) // 2)])
            self._fh.flush()
            os.fsync(self._fh.fileno())
            die()
        self._written += len(view)
        return self._fh.write(view)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def __enter__(self) -> DiesMidWrite:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._fh.close()


def arm(kind: str, n: int) -> None:
    if kind in ("step", "interrupt", "terminate"):
        signum = {"step": signal.SIGKILL, "interrupt": signal.SIGINT, "terminate": signal.SIGTERM}[kind]
        from dp_diffusion.privacy.lightning import PrivateTrainingModule

        real_step = PrivateTrainingModule.training_step

        def training_step(self: Any, *args: Any, **kwargs: Any) -> Any:
            before = self.ledger.steps
            result = real_step(self, *args, **kwargs)
            if before < n <= self.ledger.steps:
                die(signum)
            return result

        PrivateTrainingModule.training_step = training_step
    elif kind == "write":
        real_open = builtins.open
        opened = [0]

        def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            fh = real_open(file, mode, *args, **kwargs)
            if "w" in mode and ".ckpt" in os.fspath(file):
                opened[0] += 1
                if opened[0] == n:
                    return DiesMidWrite(fh)
            return fh

        builtins.open = open_
    elif kind == "written":
        real_replace = os.replace
        done = [0]

        def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            real_replace(src, dst, *args, **kwargs)
            if os.fspath(dst).endswith(".ckpt"):
                done[0] += 1
                if done[0] == n:
                    die()

        os.replace = replace
    else:
        raise SystemExit(f"unknown KILL_AT kind {kind!r}")


if __name__ == "__main__":
    if os.environ.get("KILL_AT"):
        kind, _, count = os.environ["KILL_AT"].partition(":")
        arm(kind, int(count))
    from dp_diffusion.cli import main

    main(sys.argv[1:])
