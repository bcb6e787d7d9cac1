"""One LightningModule per method; the registry maps `method.name` to it."""

METHODS = {
    "dpdm": "dp_diffusion.methods.dpdm.DPDM",
    "dp_syngen": "dp_diffusion.methods.dp_syngen.DPSynGen",
    "dp_ldm": "dp_diffusion.methods.dp_ldm.DPLDM",
    "dp_sad": "dp_diffusion.methods.dp_sad.DPSAD",
}
