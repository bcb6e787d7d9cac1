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
ENTRIES = ("dpdm_scratch", "dpdm_warm", "dpdm_warm_font", "dpdm_main", "dp_syngen", "dp_syngen_high_noise",
           "dp_ldm", "dp_ldm_condition_font_digits", "dp_ldm_main", "dp_sad")
DP_SAD_ENTRIES = ("dp_sad_paper", "dp_sad_dp_teacher", "dp_sad_warm", "dp_sad_lambda0", "dp_sad_lambda0.5")
DP_SYNGEN_ENTRIES = ("dp_syngen_no_coarse",)
DP_LDM_ENTRIES = ("dp_ldm_all", "dp_ldm_lora", "dp_ldm_attention_dead_leaves", "dp_ldm_condition_ae_dead_leaves",
                  "dp_ldm_all_font_digits")


def overrides_for(entry: str) -> subprocess.CompletedProcess:
    """The script's own `overrides_for` function, run by bash."""
    functions = "/^DP_LDM_AS_MEASURED=/p;/^dp_ldm_entry()/,/^}/p;/^overrides_for()/,/^}/p"
    program = f'source <(sed -n "{functions}" "{SCRIPT}"); overrides_for {entry}'
    return subprocess.run(["bash", "-c", program], capture_output=True, text=True)


def test_default_entries_are_the_known_ones():
    text = SCRIPT.read_text()
    assert f'METHODS=${{METHODS:-"{" ".join(ENTRIES)}"}}' in text
    assert "privacy.epsilon=\"$eps\"" in text and "dp-diffusion}" in text and '$DP report "$RESULTS"' in text


@pytest.mark.parametrize("entry", ENTRIES + DP_SAD_ENTRIES + DP_SYNGEN_ENTRIES + DP_LDM_ENTRIES)
def test_each_entry_composes_and_validates_on_mnist5k(entry):
    result = overrides_for(entry)
    assert result.returncode == 0, result.stderr
    overrides = result.stdout.split()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=[*overrides, "privacy.epsilon=1", f"+frontier={entry}"])
    resolve_public(cfg)
    validate_config(cfg)
    assert cfg.data.name == "mnist5k"
    expected_method = "dpdm" if entry.startswith("dpdm_") else entry
    assert cfg.method.name == {"dp_sad": "dp_sad", "dp_ldm": "dp_ldm", "dp_syn": "dp_syngen"}.get(entry[:6], expected_method)
    # public=auto (font_digits on mnist5k) and DP-LDM's experiment (font_digits) unless an entry pins the set it
    # was first measured with
    pinned_digits = entry in ("dpdm_warm", "dp_ldm", "dp_ldm_all", "dp_ldm_lora", "dp_ldm_condition_ae_dead_leaves")
    expected_public = {"dpdm_scratch": "none", "dp_ldm_attention_dead_leaves": "dead_leaves"}.get(
        entry, "digits" if pinned_digits or entry.startswith("dp_sad") else "font_digits")
    assert cfg.public.name == expected_public
    module = cfg.method.module
    if entry.startswith("dp_ldm_") and entry != "dp_ldm_main":
        assert module.finetune == entry.split("_")[2]
        autoencoder_public = module.autoencoder_public and module.autoencoder_public.name
        assert autoencoder_public == ("dead_leaves" if entry.endswith("_ae_dead_leaves") else None)
    if entry.startswith("dp_ldm"):
        # the entries measured before the experiment grew (session 14) pin the pretraining and DP steps they ran with
        main = entry == "dp_ldm_main"
        assert (module.pretraining.latent_steps, cfg.train.steps) == ((3000, 900) if main else (600, 300))
        assert module.finetune == {"dp_ldm": "condition", "dp_ldm_main": "all"}.get(entry, module.finetune)
    if entry.startswith("dp_syngen"):
        assert module.log_tau_coarse == (None if entry == "dp_syngen_no_coarse" else 2.0)
        assert module.log_tau_cleaning == -3.0
        # the main job's noise levels, except the entries measured before the experiment took them
        assert cfg.diffusion.P_mean == (0.5 if entry == "dp_syngen_high_noise" else -1.2)
    if entry.startswith("dp_sad"):
        assert (module.privacy_model, module.teacher.source) == {
            "dp_sad_paper": ("paper", "nonprivate"), "dp_sad_dp_teacher": ("sound", "dp")}.get(entry, ("sound", "public"))
        assert module.adversarial_weight == {"dp_sad_lambda0": 0, "dp_sad_lambda0.5": 0.5}.get(entry, 1.0)
        assert module.student_init == ("warm_start" if entry == "dp_sad_warm" else "scratch")
    if (entry.startswith("dpdm_") and entry != "dpdm_scratch") or entry == "dp_sad_warm":
        # the entries measured before the main job's warm start grew to 1500 steps pin the 600 they ran with
        assert module.warm_start.steps == (1500 if entry == "dpdm_main" else 600)


def test_an_unknown_entry_is_refused():
    result = overrides_for("dpdm_typo")
    assert result.returncode != 0 and "unknown frontier entry dpdm_typo" in result.stderr
    result = overrides_for("dp_ldm_everything")
    assert result.returncode != 0 and "unknown DP-LDM fine-tuned part: everything" in result.stderr
    result = overrides_for("dp_ldm_lora_emnist")
    assert result.returncode != 0 and "unknown DP-LDM public set: emnist" in result.stderr


def test_an_unknown_entry_stops_the_script_before_any_run(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env={
        "PATH": "/usr/bin:/bin", "DP": "echo ran:", "METHODS": "dpdm_typo", "EPSILONS": "1", "OUT": str(tmp_path)})
    assert result.returncode != 0 and "ran:" not in result.stdout
