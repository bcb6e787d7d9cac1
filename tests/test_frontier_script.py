"""experiments/frontier_mnist5k.sh: every entry it runs composes and validates as a training config, and an
unknown entry is refused."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from dp_diffusion.cli import CONF_DIR
from dp_diffusion.data.public import resolve_public
from dp_diffusion.run_config import validate_config

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "frontier_mnist5k.sh"
ENTRIES = ("dpdm_scratch", "dpdm_warm", "dp_syngen", "dp_ldm", "dp_sad")


def overrides_for(entry: str) -> subprocess.CompletedProcess:
    """The script's own `overrides_for` function, run by bash."""
    program = f'source <(sed -n "/^overrides_for()/,/^}}/p" "{SCRIPT}"); overrides_for {entry}'
    return subprocess.run(["bash", "-c", program], capture_output=True, text=True)


def test_default_entries_are_the_known_ones():
    text = SCRIPT.read_text()
    assert f'METHODS=${{METHODS:-"{" ".join(ENTRIES)}"}}' in text
    assert "privacy.epsilon=\"$eps\"" in text and "dp-diffusion}" in text and '$DP report "$RESULTS"' in text


@pytest.mark.parametrize("entry", ENTRIES)
def test_each_entry_composes_and_validates_on_mnist5k(entry):
    result = overrides_for(entry)
    assert result.returncode == 0, result.stderr
    overrides = result.stdout.split()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=[*overrides, "privacy.epsilon=1", f"+frontier={entry}"])
    resolve_public(cfg)
    validate_config(cfg)
    assert cfg.data.name == "mnist5k"
    expected_method = {"dpdm_scratch": "dpdm", "dpdm_warm": "dpdm"}.get(entry, entry)
    assert cfg.method.name == expected_method
    assert cfg.public.name == {"dpdm_scratch": "none", "dp_sad": "dead_leaves", "dp_syngen": "digits"}.get(
        entry, "digits")


def test_an_unknown_entry_is_refused():
    result = overrides_for("dpdm_typo")
    assert result.returncode != 0 and "unknown frontier entry dpdm_typo" in result.stderr
