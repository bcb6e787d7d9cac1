"""Issue 13 "Keep": DPDM and DP-SynGen train exactly as at commit fd81818 (before the privacy core, build.py
and the methods were reshaped): the same seed gives the same calibrated sigma, the same ledger, the same
headline epsilon and, on CPU, bit-identical weights.

The figures are in tests/keep_fd81818.json, recorded by tests/record_keep.py (its docstring says how to
record them again). Each case trains through `run_training`, the path `dp-diffusion train` takes.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from record_keep import COMMON, SETTINGS, train_once  # noqa: E402

RECORDED = json.loads((Path(__file__).parent / "keep_fd81818.json").read_text())

pytestmark = pytest.mark.usefixtures("one_thread")  # the figures were recorded on one thread


def _weight_mismatches(got: dict[str, float], want: dict[str, float]) -> list[str]:
    """Tensors whose float64 sums differ by more than 1e-12 relative (or are missing / new)."""
    lines = [f"missing {k}" for k in want if k not in got] + [f"new {k}" for k in got if k not in want]
    for key in want.keys() & got.keys():
        a, b = got[key], want[key]
        if not math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300):
            lines.append(f"{key}: sum {a!r} != recorded {b!r}")
    return sorted(lines)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_trains_exactly_as_at_fd81818(name: str, tmp_path: Path) -> None:
    want: dict[str, Any] = RECORDED["settings"][name]
    assert want["bit_identical_across_runs"], "the recording itself was not reproducible"
    assert want["overrides"] == SETTINGS[name] and RECORDED["common_overrides"] == COMMON, (
        "the settings changed since the recording: record again (tests/record_keep.py)")
    got = train_once(SETTINGS[name], tmp_path / "run")

    assert got["noise_multiplier"] == want["noise_multiplier"]  # calibrated sigma, exactly
    assert got["sample_rate"] == want["sample_rate"]
    assert got["ledger"] == want["ledger"]  # as the checkpoint stores it
    assert got["report_mechanisms"] == want["report_mechanisms"]  # as privacy.json states it
    assert got["steps"] == want["steps"]
    assert got["epsilon"] == want["epsilon"] == got["record_epsilon"]
    assert (got["epsilon_prv"], got["epsilon_rdp"]) == (want["epsilon_prv"], want["epsilon_rdp"])

    mismatches = _weight_mismatches(got["weights"]["sums"], want["weights"]["sums"])
    assert not mismatches, f"{len(mismatches)} tensors differ from fd81818:\n" + "\n".join(mismatches[:20])
    assert list(got["weights"]["sums"]) == list(want["weights"]["sums"]), "same tensors, other key order"
    assert got["weights"]["sha256"] == want["weights"]["sha256"], (
        "weights within 1e-12 of fd81818 (every tensor's sum) but not bit-identical")
