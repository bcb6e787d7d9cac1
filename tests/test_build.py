"""`build_method`: a method is built from the parts its config lists by `_target_`, each given the shapes
it takes (from the data, or from a part built before it); bad part configs are one-line ConfigErrors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from torch import nn

from dp_diffusion.build import accepted, build_method, config_to_dict
from dp_diffusion.cli import CONF_DIR
from dp_diffusion.config import ConfigError
from dp_diffusion.data.registry import dataset_info
from dp_diffusion.nets import UNet

DIGITS = dataset_info("digits")  # 1 x 8 x 8, 10 classes


def compose_cfg(*overrides: str):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["data=digits", "model=tiny", *overrides])


# --- a toy two-part method: the head is sized by the encoder built before it ----------------------
class Encoder(nn.Module):
    """Takes only in_channels of the data's shapes."""

    def __init__(self, in_channels: int, width: int = 3) -> None:
        super().__init__()
        self.in_channels, self.width = in_channels, width


def make_head(**kwargs: Any) -> dict[str, Any]:
    """Takes **kwargs: receives every shape offered."""
    return kwargs


class ToyMethod:
    """Parts `encoder` and `head`; takes only some of the run's settings."""

    def __init__(self, encoder: Encoder, head: dict[str, Any], loss: Any, steps: int, scale: float = 1.0) -> None:
        self.encoder, self.head, self.loss, self.steps, self.scale = encoder, head, loss, steps, scale

    @classmethod
    def part_shapes(cls, part: str, data: Mapping[str, Any], built: Mapping[str, Any]) -> dict[str, Any]:
        if part == "head":
            return {"features": built["encoder"].width * data["resolution"] ** 2}
        return dict(data)


def toy_cfg(*overrides: str):
    cfg = compose_cfg("train.steps=7", *overrides)
    with open_dict(cfg):
        cfg.method.parts = {"encoder": {"_target_": f"{__name__}.Encoder", "width": 5},
                            "head": {"_target_": f"{__name__}.make_head"}}
        cfg.method.module = {"_target_": f"{__name__}.ToyMethod", "scale": 2.0}
    return cfg


def test_parts_are_built_in_order_with_the_shapes_they_take():
    method = build_method(toy_cfg(), DIGITS)
    assert isinstance(method, ToyMethod) and method.steps == 7 and method.scale == 2.0
    assert method.encoder.in_channels == 1 and method.encoder.width == 5
    assert method.head == {"features": 5 * 8 * 8}  # from part_shapes: the encoder built before it


def test_accepted_filters_by_signature():
    offered = {"in_channels": 1, "resolution": 8, "image_shape": (1, 8, 8)}
    assert accepted(Encoder, offered) == {"in_channels": 1}
    assert accepted(make_head, offered) == offered
    assert set(accepted(UNet, {**offered, "num_classes": 3, "out_channels": 1})) == {
        "in_channels", "resolution", "num_classes", "out_channels"}


def test_dpdm_backbone_is_the_model_group_sized_by_the_data():
    cfg = compose_cfg("model.nf=8", "diffusion=edm")
    assert OmegaConf.to_container(cfg.method.parts, resolve=False) == {"backbone": "${model}"}
    assert config_to_dict(cfg.method)["parts"]["backbone"]["nf"] == 8  # resolved into checkpoints
    module = build_method(cfg, DIGITS)
    unet = module.denoiser.backbone
    assert isinstance(unet, UNet) and unet.conv_in.in_channels == 1 and unet.conv_in.out_channels == 8
    assert unet.label_embed.num_embeddings == 11  # 10 classes + the null class


@pytest.mark.parametrize("method", ["dpdm", "dp_syngen"])
def test_a_config_without_parts_builds_the_same_module(method):
    """Checkpoints written before methods listed their parts store configs without method.parts."""
    cfg = compose_cfg(f"method={method}")
    legacy = cfg.copy()
    with open_dict(legacy):
        del legacy.method["parts"]
    torch.manual_seed(0)
    new = build_method(cfg, DIGITS).state_dict()
    torch.manual_seed(0)
    old = build_method(legacy, DIGITS).state_dict()
    assert list(new) == list(old) and all(torch.equal(new[k], old[k]) for k in new)


@pytest.mark.parametrize("change,message", [
    ({"method.parts": [1, 2]}, r"^method.parts must map each part's name"),
    ({"method.parts.backbone": {"nf": 8}}, r"^method.parts.backbone must be a config with a _target_"),
    ({"method.parts.backbone": {"_target_": "dp_diffusion.nets.NoSuchNet"}},
     r"^method.parts.backbone._target_='dp_diffusion.nets.NoSuchNet' cannot be imported"),
    ({"model.nf": "wide"}, r"^model \(method.parts.backbone\) for data set 'digits': "),
    ({"model.attn_resolutions": [3]}, r"^model \(method.parts.backbone\) for data set 'digits': "),
    ({"method.parts.critic": {"_target_": "torch.nn.Identity"}}, r"^method.parts.critic: DPDM takes no part 'critic'"),
    ({"method.parts": {"other": "${model}"}}, r"^method.parts.other: DPDM takes no part"),
])
def test_bad_part_configs_are_one_line_errors_naming_the_key(change, message):
    cfg = compose_cfg()
    with open_dict(cfg):
        for key, value in change.items():
            OmegaConf.update(cfg, key, value, merge=False)
    with pytest.raises(ConfigError, match=message) as err:
        build_method(cfg, DIGITS)
    assert "\n" not in str(err.value)


def test_a_part_the_method_needs_but_the_config_lacks():
    cfg = toy_cfg()
    with open_dict(cfg):
        del cfg.method.parts["head"]
    with pytest.raises(ConfigError, match=r"^method.parts lacks head, which ToyMethod is built from"):
        build_method(cfg, DIGITS)


def test_a_bad_method_target_is_a_config_error():
    cfg = compose_cfg()
    with open_dict(cfg):
        cfg.method.module._target_ = "dp_diffusion.methods.nothing.Here"
    with pytest.raises(ConfigError, match=r"^method.module: "):
        build_method(cfg, DIGITS)


def test_a_module_key_the_method_does_not_take():
    with pytest.raises(ConfigError, match=r"^method.module.bogus: DPDM takes no argument 'bogus'"):
        build_method(compose_cfg("+method.module.bogus=1"), DIGITS)
