"""Checkpoints are written atomically and read without running code from them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dp_diffusion.build import CONFIG_KEY
from dp_diffusion.checkpoints import (CheckpointError, SafeCheckpointIO, check_run_dir, clear_checkpoints,
                                      read_checkpoint, save_atomically)
from dp_diffusion.config import ConfigError


def ours(value: float = 1.0) -> dict:
    return {CONFIG_KEY: {"seed": 0}, "state_dict": {"w": torch.full((64, 64), value)}, "global_step": 3}


class RunsCode:
    """Unpickling this would call Path.touch: what a hostile checkpoint could do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def one_line_naming(err: pytest.ExceptionInfo, path: Path) -> None:
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message


def test_save_then_read_round_trips_and_leaves_no_partial_file(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    save_atomically(ours(2.0), path)
    state = read_checkpoint(path)
    assert torch.equal(state["state_dict"]["w"], torch.full((64, 64), 2.0)) and state["global_step"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_atomically(ours(1.0), path)
    real_save = torch.save

    def half_then_fail(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 half a zip")  # the start of a file that never gets its end
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError):
        save_atomically(ours(5.0), path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(read_checkpoint(path)["state_dict"]["w"], torch.full((64, 64), 1.0))


def test_missing_truncated_and_foreign_files_are_one_line_errors_naming_them(tmp_path):
    full = tmp_path / "full.ckpt"
    save_atomically(ours(), full)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, foreign)  # a torch file, but not one of ours
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    for path in (tmp_path / "missing.ckpt", tmp_path, truncated, text, foreign, empty):
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(path)
        one_line_naming(err, path)
    assert issubclass(CheckpointError, ConfigError)  # the CLI prints it as one line, exit status 2


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    hostile = tmp_path / "hostile.ckpt"
    torch.save({CONFIG_KEY: {}, "payload": RunsCode(marker)}, hostile)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(hostile)
    one_line_naming(err, hostile)
    assert not marker.exists()


def test_lightning_io_saves_atomically_and_loads_preloaded_state_once(tmp_path):
    io = SafeCheckpointIO(preloaded={str(tmp_path / "resume.ckpt"): ours(7.0)})
    # A preloaded resume checkpoint is not read again (and need not even exist any more)...
    assert io.load_checkpoint(str(tmp_path / "resume.ckpt"))["state_dict"]["w"][0, 0] == 7.0
    # ... but only once; later loads read the file, safely.
    with pytest.raises(CheckpointError):
        io.load_checkpoint(str(tmp_path / "resume.ckpt"))
    io.save_checkpoint(ours(3.0), tmp_path / "ck" / "step2.ckpt")
    assert io.load_checkpoint(tmp_path / "ck" / "step2.ckpt", weights_only=False)["state_dict"]["w"][0, 0] == 3.0
    assert os.listdir(tmp_path / "ck") == ["step2.ckpt"]


def test_run_dir_with_checkpoints_is_refused_unless_resumed_in_place_or_overwritten(tmp_path):
    run = tmp_path / "run"
    check_run_dir(run, None, overwrite=False)  # fresh: fine
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step6.ckpt.partial").write_bytes(b"half")  # a killed write is not a checkpoint
    check_run_dir(run, None, overwrite=False)
    for name in ("step4.ckpt", "last.ckpt", "final.ckpt"):
        save_atomically(ours(), run / "checkpoints" / name)
    with pytest.raises(ConfigError) as err:
        check_run_dir(run, None, overwrite=False)
    message = str(err.value)
    assert "\n" not in message and str(run) in message and "overwrite=true" in message
    assert f"resume={(run / 'checkpoints' / 'last.ckpt').resolve()}" in message
    elsewhere = tmp_path / "other" / "last.ckpt"
    save_atomically(ours(), elsewhere)
    with pytest.raises(ConfigError):  # continuing another run here would mix two runs' checkpoints
        check_run_dir(run, elsewhere, overwrite=False)
    check_run_dir(run, run / "checkpoints" / "last.ckpt", overwrite=False)  # continue this run in place
    with pytest.raises(ConfigError, match="overwrite=true"):  # ... but not while deleting what it resumes from
        check_run_dir(run, run / "checkpoints" / "last.ckpt", overwrite=True)
    check_run_dir(run, None, overwrite=True)
    removed = clear_checkpoints(run)
    assert len(removed) == 4 and list((run / "checkpoints").iterdir()) == []
