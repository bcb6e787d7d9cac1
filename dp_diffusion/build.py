"""Builds a method's LightningModule from a composed config (train, sample, evaluate and audit share it).

A method's config lists the parts it is made of, each by `_target_`:

    method:
      parts:
        backbone: ${model}          # DPDM, DP-SynGen: the denoiser's UNet (the model/ group)
      module:
        _target_: dp_diffusion.methods.dpdm.DPDM
        lr: 3.0e-4

Each part is instantiated in the order listed and handed to the method's class as the constructor
argument of the same name, together with the loss (`diffusion/`) and the run's settings (privacy spec,
batch sizes, planned steps, ...). Shapes come from the data: every part is offered `in_channels`,
`out_channels`, `resolution`, `num_classes` and `image_shape` and receives those its `_target_` names
as parameters (all of them if it takes `**kwargs`), so an autoencoder, a discriminator or a teacher
loaded from a checkpoint is built without a change here. A part sized by another part (a latent UNet
by the autoencoder's latent shape) is listed after it, and the method's classmethod
`part_shapes(part, data, built)` returns its shapes from the parts built so far.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dp_diffusion.config import ConfigError
from dp_diffusion.data.public import resolve_public
from dp_diffusion.data.registry import DatasetInfo
from dp_diffusion.privacy import PrivacySpec, PrivateTrainingModule, plan_steps

# Where `dp-diffusion train` stores the resolved run config in each checkpoint.
CONFIG_KEY = "dp_diffusion_config"
# The parts of a config written before methods listed theirs (checkpoints of DPDM and DP-SynGen).
LEGACY_PARTS = {"backbone": "model"}


def planned_steps(cfg: DictConfig, num_examples: int) -> int:
    if cfg.train.steps is not None:
        return int(cfg.train.steps)
    return plan_steps(num_examples, cfg.train.batch_size, cfg.train.epochs)


def data_shapes(info: DatasetInfo, num_classes: int) -> dict[str, Any]:
    """The shape arguments the private data gives a part: channels in and out, resolution, classes."""
    channels, height, _ = info.image_shape
    return {"in_channels": channels, "out_channels": channels, "resolution": height, "num_classes": num_classes,
            "image_shape": tuple(info.image_shape)}


def parameters_of(target: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], bool]:
    """The named parameters `target` takes and whether it takes any keyword besides. A class whose `__init__`
    passes `**settings` on to its base (a method forwarding the run's settings to `PrivateDiffusion`) takes
    its base's parameters too: the walk up the class's bases stops at the first `__init__` without `**`."""
    owners = [c for c in target.__mro__ if "__init__" in vars(c)] if inspect.isclass(target) else [target]
    named: dict[str, inspect.Parameter] = {}
    for owner in owners:
        try:
            signature = inspect.signature(owner.__init__ if inspect.isclass(owner) else owner)
        except (TypeError, ValueError):  # no introspectable signature: nothing known
            return named, False
        for name, p in signature.parameters.items():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "self":
                named.setdefault(name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            return named, False
    return named, True


def accepted(target: Callable[..., Any], offered: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `offered` that `target` takes: those it names as parameters (see `parameters_of`), all
    if it takes any keyword."""
    named, takes_any = parameters_of(target)
    return dict(offered) if takes_any else {key: value for key, value in offered.items() if key in named}


def locate(path: str) -> Any:
    """The object a dotted `_target_` names (module, then attributes); ImportError or AttributeError if none.

    An error raised while importing a module that exists is not caught: it is a bug there, not a typo here.
    """
    names = path.split(".")
    for end in range(len(names), 0, -1):
        module_name = ".".join(names[:end])
        try:
            found: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and module_name.startswith(err.name):
                continue  # no such module: try a shorter prefix
            raise
        for depth in range(end, len(names)):
            if not hasattr(found, names[depth]):
                raise AttributeError(f"{'.'.join(names[:depth])} has no attribute {names[depth]!r}")
            found = getattr(found, names[depth])
        return found
    raise ImportError(f"no module named {names[0]!r}")


def _first_line(err: BaseException) -> str:
    cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ is not None else err
    text = str(cause).strip() or type(cause).__name__
    return text.splitlines()[0][:300]


def part_configs(cfg: DictConfig) -> dict[str, tuple[str, Any]]:
    """Each part's name -> (the config key a user overrides it by, its config node), in build order."""
    method = cfg.method
    if "parts" not in method or method.parts is None:
        return {name: (group, cfg[group]) for name, group in LEGACY_PARTS.items()}
    parts = method.parts
    raw = OmegaConf.to_container(parts, resolve=False) if OmegaConf.is_config(parts) else parts
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"method.parts must map each part's name to its config (with a _target_), got {raw!r}")
    out = {}
    for name, value in raw.items():
        key = f"method.parts.{name}"
        if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
            key = f"{value[2:-1]} ({key})"  # e.g. ${model}: name the group the user overrides
        out[str(name)] = (key, method.parts[name])
    return out


def build_part(key: str, node: Any, offered: Mapping[str, Any], data_name: str = "") -> Any:
    """Instantiate one part's config `node`, passing it the entries of `offered` its `_target_` takes."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"{key} must be a config with a _target_ (the class or function that builds the part), "
                          f"got {OmegaConf.to_container(node) if isinstance(node, DictConfig) else node!r}")
    try:
        target = locate(str(node._target_))
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{key}._target_={node._target_!r} cannot be imported: {_first_line(err)}") from None
    try:
        return instantiate(node, **accepted(target, offered))
    except (InstantiationException, ValueError, TypeError) as err:
        sized = f" for data set {data_name!r}" if data_name else ""
        raise ConfigError(f"{key}{sized}: {_first_line(err)}") from None


def build_parts(configs: Mapping[str, tuple[str, Any]], method_cls: type, data: Mapping[str, Any],
                data_name: str = "") -> dict[str, Any]:
    """Every part in `configs` (from `part_configs`), built in order, each offered `method_cls.part_shapes`."""
    part_shapes = getattr(method_cls, "part_shapes", None)
    built: dict[str, Any] = {}
    for name, (key, node) in configs.items():
        offered = part_shapes(name, data, dict(built)) if part_shapes is not None else dict(data)
        built[name] = build_part(key, node, offered, data_name)
    return built


def check_arguments(method_cls: type, parts: Mapping[str, Any], module_args: Mapping[str, Any],
                    run_args: Mapping[str, Any]) -> None:
    """One-line errors for a part or `method.module` key the method does not take, and for a constructor
    argument that no part, `method.module` key or run setting gives."""
    parameters, takes_any = parameters_of(method_cls)
    for group, names in (("method.parts", parts), ("method.module", module_args)):
        unknown = [name for name in names if name not in parameters and not takes_any]
        if unknown:
            what = "part" if group == "method.parts" else "argument"
            raise ConfigError(f"{group}.{unknown[0]}: {method_cls.__name__} takes no {what} {unknown[0]!r} "
                              f"(its constructor takes {', '.join(parameters)})")
    own = inspect.signature(method_cls).parameters  # required: the class's own (a base's come via **settings)
    missing = [name for name, p in own.items()
               if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and name not in parts and name not in module_args and name not in run_args]
    if missing:
        raise ConfigError(f"method.parts lacks {', '.join(missing)}, which {method_cls.__name__} is built from "
                          f"(method.parts lists {', '.join(parts) or 'nothing'})")


def build_method(cfg: DictConfig, info: DatasetInfo, num_examples: int | None = None) -> PrivateTrainingModule:
    """The method's module with its parts and loss, sized for data set `info` (`public=auto` resolved in `cfg`)."""
    resolve_public(cfg)
    num_classes = info.num_classes if cfg.method.conditional else 0
    try:
        # Partial: parts, loss and spec are passed as objects, not through OmegaConf.
        method = instantiate(cfg.method.module, _partial_=True)
    except InstantiationException as err:
        raise ConfigError(f"method.module: {_first_line(err)}") from None
    method_cls = method.func
    loss_overrides: dict[str, Any] = {"num_classes": num_classes}
    if num_classes == 0 and "label_dropout" in cfg.diffusion:
        loss_overrides["label_dropout"] = 0.0
    try:
        loss = instantiate(cfg.diffusion, **loss_overrides)
    except (InstantiationException, ValueError) as err:
        raise ConfigError(f"diffusion config for data set {info.name!r}: {_first_line(err)}") from None
    run = {
        "loss": loss,
        "privacy": PrivacySpec.from_config(cfg.privacy),
        "batch_size": cfg.train.batch_size,
        "physical_batch_size": cfg.train.physical_batch_size,
        "steps": planned_steps(cfg, num_examples or info.num_train),
        "image_shape": tuple(info.image_shape),
        "num_classes": num_classes,
        "seed": cfg.seed,
        "num_workers": cfg.train.num_workers,
    }
    run = accepted(method_cls, run)
    configs = part_configs(cfg)
    check_arguments(method_cls, configs, method.keywords, run)
    parts = build_parts(configs, method_cls, data_shapes(info, num_classes), info.name)
    return method(**parts, **run)


def config_to_dict(cfg: DictConfig) -> dict[str, Any]:
    """A plain, resolved copy of the config (stored in checkpoints and results)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
