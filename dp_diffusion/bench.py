"""What DP-SGD costs over ordinary training, measured in one run (DESIGN.md, Performance).

For one method (`--method`, conf/method/), one model (`--model`, conf/model/), one batch and one device
this times

1. the non-private step: the method's module built with `privacy.enabled=false` (its non-private
   twin), through the same `prepare_batch` + `private_step` as the DP rows: the engine's
   non-private path, forward + backward + Adam on the mean per-example loss of B examples with
   K noise draws each (B*K rows): the baseline;
2. the DP step, the same module built with privacy on: `prepare_batch` then `private_step` for
   each private part, exactly as its `training_step` calls them (one physical chunk of B unless
   `--physical-batch-size`), for each per-example gradient mode (grouped, functorch, opacus, ghost
   clipping) and each noise multiplicity K; the baseline is re-timed at every K (its work grows
   with K too) and every DP row is divided by the baseline at the same K;
3. sampling throughput of each sampler with the raw (EMA-free) denoiser;
4. on CUDA (on CPU with `--variants`), the non-private and grouped DP steps
   again under bf16 autocast, channels-last and torch.compile (a DP variant
   is timed only if its per-example gradients match eager fp32 ones; hooks
   and compilers can silently disagree). The grouped mode's layer hooks
   cannot see inside a compiled model, so its compile row is reported as
   skipped, with that reason;
5. with `--against METHOD` (e.g. `--method dp_sad --against dpdm`), that method's DP step at the same
   batch, K and first DP mode, in the same round robin: a row whose note gives this method's DP step
   over it (what one step of the method costs against another's).

Each row's module comes from `build_method` on a config composed from conf/ (as `dp-diffusion train`
builds it; `--override key=value` is passed to the composition), so any method that trains through
the privacy core is benchmarked through the code that trains it.

Every call is timed after warm-up calls, with `torch.cuda.synchronize()` on
CUDA, and the median of `repeats` is reported. Writes a Markdown table and the
raw numbers as JSON; `--compare OLD.json` adds the ratio now / then per row.

    python -m dp_diffusion.bench --model tiny --batch-size 8 --repeats 2
    dp-diffusion bench --method dp_syngen --override method.module.log_tau_cleaning=null
    dp-diffusion bench --device cuda --compare benchmarks/results/old.json
    dp-diffusion bench --method dp_sad --against dpdm --model tiny --batch-size 256 --modes grouped
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, open_dict
from torch import Tensor
from torch.utils._pytree import tree_map
from torch.utils.data import Dataset

from dp_diffusion import allocator
from dp_diffusion.build import build_method
from dp_diffusion.config import ConfigError
from dp_diffusion.data.public import resolve_public
from dp_diffusion.run_config import validate_config
from dp_diffusion.data.registry import dataset_info
from dp_diffusion.diffusion.samplers import SAMPLERS, generate
from dp_diffusion.privacy import PrivateOptimization, PrivateTrainingModule
from dp_diffusion.privacy.grad_samplers import supports
from dp_diffusion.privacy.per_example import make_per_example_gradients, trainable_parameters
from dp_diffusion.privacy.validation import PrivacyError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
METHODS = tuple(sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml")))  # --method: conf/method/
MODELS = tuple(sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))  # --model: conf/model/
GRAD_MODES = ("grouped", "functorch", "opacus", "ghost")
NEEDS_GRAD_SAMPLERS = ("grouped", "ghost")  # modes built on privacy/grad_samplers.py
VARIANTS = {"bf16": "bf16 autocast", "channels_last": "channels-last", "compile": "torch.compile"}
NOISE_MULTIPLIER = 1.0  # any sigma > 0 costs the same; accounting is not timed
MAX_GRAD_NORM = 1.0
# Applied after method= and model=, before --override: MNIST-shaped data (N = 60,000 only sets the sample
# rate q = B / N of the plan), the EDM loss of DPDM, sigma and C fixed (no calibration), 1000 planned steps.
BENCH_OVERRIDES = ("data=mnist", "diffusion=edm", f"privacy.noise_multiplier={NOISE_MULTIPLIER}",
                   f"privacy.max_grad_norm={MAX_GRAD_NORM}", "privacy.accountant=rdp", "train.steps=1000")
# Config keys the bench sets per row from its own options: --override may not set them.
FLAG_KEYS = {
    "method": "--method", "model": "--model", "seed": "--seed", "train.batch_size": "--batch-size",
    "train.physical_batch_size": "--physical-batch-size", "privacy.noise_multiplicity": "--noise-multiplicity",
    "privacy.grad_mode": "--modes", "privacy.enabled": "--modes (the non-private twin is always timed)",
    "privacy": "--modes (the non-private twin is always timed)",
}
# Largest relative error ||g - g_eager|| / ||g_eager|| of the per-example
# gradients a DP variant may have and still be timed.
VARIANT_TOLERANCE = {"bf16": 0.1, "channels_last": 1e-3, "compile": 1e-3}


class BenchSettingsError(ValueError):
    """A benchmark setting the user must change (the message names the option)."""


# --- building blocks ------------------------------------------------------------------------------
# Every row's module is built by `build_method` from a config composed out of conf/, as `dp-diffusion train`
# builds it, and every row's step is the module's own DP call; nothing below re-implements a loss or a step.
def compose_config(method: str = "dpdm", model: str = "dpdm", overrides: Sequence[str] = ()) -> DictConfig:
    """conf/config.yaml composed with `method=<method> model=<model>`, the bench's fixed settings
    (`BENCH_OVERRIDES`: MNIST shape, EDM loss, sigma and C fixed, no calibration) and then `overrides`."""
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in FLAG_KEYS:
            raise BenchSettingsError(f"--override {item}: set {key} with {FLAG_KEYS[key]}")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"method={method}", f"model={model}", *BENCH_OVERRIDES, *overrides])
    except HydraException as err:
        raise BenchSettingsError(f"--override: {str(err).strip().splitlines()[0]}") from None
    try:
        resolve_public(cfg)
    except ConfigError as err:
        raise BenchSettingsError(f"config: {err}") from None
    return cfg


def row_config(cfg: DictConfig, batch_size: int, physical_batch_size: int | None, noise_multiplicity: int,
               mode: str | None, seed: int) -> DictConfig:
    """`cfg` for one row: DP with per-example gradient `mode`, or (mode None) its non-private twin, the same
    config with `privacy.enabled=false` (no clipping, no noise: the engine's non-private path)."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.seed = seed
        cfg.train.batch_size = batch_size
        cfg.train.physical_batch_size = physical_batch_size or batch_size
        cfg.privacy.noise_multiplicity = noise_multiplicity
        cfg.privacy.enabled = mode is not None
        if mode is not None:
            cfg.privacy.grad_mode = mode
    try:
        validate_config(cfg)
    except ConfigError as err:
        raise BenchSettingsError(f"config: {err}") from None
    return cfg


class _PlannedData(Dataset):
    """Stands in for the private data set: only its size is read (the sample rate q = B / N of the plan)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Any:
        raise RuntimeError("the benchmark feeds its own batches; the data set only sets N")


def build_module(cfg: DictConfig, device: torch.device, variant: str | None = None) -> PrivateTrainingModule:
    """The method's module for data set `cfg.data`, as `dp-diffusion train` builds it, seeded with `cfg.seed`.

    Every private part's weights get N(0, 0.01^2) added (DDPM++ zero-initialises every residual branch's
    last conv and the output conv, so at init almost every gradient is exactly zero; the timed and checked
    gradients should be generic). Then `variant` is applied to the private parts and the module's own
    `configure_optimizers` builds its engines.
    """
    info = dataset_info(cfg.data.name)
    torch.manual_seed(cfg.seed)
    try:
        module = build_method(cfg, info, info.num_train)
    except (ConfigError, TypeError) as err:
        raise BenchSettingsError(f"config: {err}") from None
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for part in module.private_parts().values():
            for p in part.parameters():
                p.add_(torch.randn(p.shape, generator=generator), alpha=0.01)
    module.attach_private_data(_PlannedData(info.num_train))
    module.to(device)
    for part in module.private_parts().values():
        if variant == "channels_last":
            part.to(memory_format=torch.channels_last)
        elif variant == "compile":
            part.compile()  # in place: parameter names (and state_dict keys) unchanged
    module.configure_optimizers()
    return module


def make_batch(cfg: DictConfig, batch_size: int, device: torch.device, seed: int = 0,
               variant: str | None = None) -> tuple[Tensor, Tensor]:
    """(images, labels) shaped like data set `cfg.data`, what the Poisson loader hands `training_step`;
    the same at every K (the module's `prepare_batch` adds the K noise draws)."""
    info = dataset_info(cfg.data.name)
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand((batch_size, *info.image_shape), generator=generator) * 2 - 1
    labels = torch.randint(0, max(1, info.num_classes), (batch_size,), generator=generator)
    images = images.to(device)
    return (_channels_last(images) if variant == "channels_last" else images), labels.to(device)


def _channels_last(value: Any) -> Any:
    """An image batch (4-d tensor) in channels-last memory format; anything else unchanged."""
    if isinstance(value, Tensor) and value.dim() == 4:
        return value.contiguous(memory_format=torch.channels_last)
    return value


def _autocast(device: torch.device, variant: str | None):
    if variant == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def part_losses(module: PrivateTrainingModule, device: torch.device,
                variant: str | None = None) -> dict[str, Callable[[Any, Any], Tensor]]:
    """Each private part's per-example loss as the module's `training_step` passes it to `private_step`
    (under the variant's autocast): the module's `per_example_losses()`."""
    losses = module.per_example_losses()
    if variant != "bf16":
        return losses

    def under_autocast(loss_fn: Callable[[Any, Any], Tensor]) -> Callable[[Any, Any], Tensor]:
        def wrapped(model: Any, batch: Any) -> Tensor:
            with _autocast(device, variant):
                return loss_fn(model, batch)
        return wrapped

    return {part: under_autocast(fn) for part, fn in losses.items()}


def timed_step(module: PrivateTrainingModule, batch: Any, losses: dict[str, Callable[[Any, Any], Tensor]]
                  ) -> Callable[[], None]:
    """What the module's `training_step` does for its private parts, without a trainer:
    `prepare_batch` (the random draws), then one `private_step` per private part.

    Trainer-free on purpose: a Lightning trainer would add its loop, logging, progress bar, callbacks and
    the budget guard to every timed call, none of which is the DP-SGD step. Without a trainer
    `private_step` steps the engine's optimizer directly (`_wrapped` falls back to it), where a trainer's
    `LightningOptimizer` would only add a closure call under 32-bit precision. The EMA update
    (`on_private_step`) and logging are left out, as in both the DP and the non-private rows.
    """

    def step() -> None:
        prepared = module.prepare_batch(batch)
        for part, loss_fn in losses.items():
            module.private_step(part, loss_fn, prepared)

    return step


def gradient_error(got: dict[str, Tensor], want: dict[str, Tensor]) -> tuple[float, int]:
    """Relative error ||got - want|| / ||want|| over all per-example gradients, and how many
    tensors are all zero in `got` but not in `want` (a hook that silently stopped firing)."""
    diff = sum(float((got[k].float() - want[k].float()).square().sum()) for k in want)
    norm = sum(float(want[k].float().square().sum()) for k in want)
    lost = sum(1 for k in want if not got[k].any() and want[k].any())
    return math.sqrt(diff / norm) if norm > 0 else math.sqrt(diff), lost


# --- timing and memory ----------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of the timed calls.

    CUDA: `torch.cuda.max_memory_allocated` (everything live: model, Adam state,
    batch, step temporaries). CPU (Linux): peak RSS (VmHWM, reset through
    /proc/self/clear_refs) minus RSS at the start, after `malloc_trim`: the
    step's temporaries. Elsewhere: not measured.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._rss_start: float | None = None
        self.available = device.type == "cuda" or self._reset_hwm()
        self._libc = None
        if device.type == "cpu":
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                pass

    @property
    def label(self) -> str:
        if self.device.type == "cuda":
            return "peak CUDA MiB (max_memory_allocated)"
        if self.available:
            return "peak RSS growth MiB (VmHWM - RSS at start)"
        return "peak memory (not measured on this OS)"

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak-RSS high-water mark (Linux >= 4.0)
            return _proc_status_mib("VmHWM") is not None
        except OSError:
            return False

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.available:
            if self._libc is not None:
                self._libc.malloc_trim(0)  # hand freed heap back so RSS at start is what is live
            self._rss_start = _proc_status_mib("VmRSS")
            self._reset_hwm()

    def stop(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.available and self._rss_start is not None:
            peak = _proc_status_mib("VmHWM")
            return None if peak is None else max(0.0, peak - self._rss_start)
        return None


def _first_call_then_warm_up(fn: Callable[[], Any], device: torch.device, warmup: int) -> float:
    """Time the first call (ms), then make `warmup - 1` more untimed calls."""
    start = time.perf_counter()
    fn()
    _sync(device)
    first_ms = (time.perf_counter() - start) * 1e3
    for _ in range(warmup - 1):
        fn()
    _sync(device)
    return first_ms


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int,
               memory: PeakMemory) -> dict[str, Any]:
    """First-call time, then `warmup - 1` more untimed calls, then `repeats` timed ones (ms) and their peak memory."""
    first_ms = _first_call_then_warm_up(fn, device, warmup)
    memory.start()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"ms": statistics.median(times), "times_ms": times, "first_call_ms": first_ms, "peak_mib": memory.stop()}


def warm_up(fn: Callable[[], Any], device: torch.device, warmup: int, memory: PeakMemory) -> dict[str, Any]:
    """First-call time, `warmup - 1` more untimed calls, then the peak memory of one more call."""
    first_ms = _first_call_then_warm_up(fn, device, warmup)
    memory.start()
    fn()
    _sync(device)
    return {"first_call_ms": first_ms, "peak_mib": memory.stop()}


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and ("out of memory" in str(err) or "can't allocate memory" in str(err))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}"


# --- the benchmark --------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchSettingsError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise BenchSettingsError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device: torch.device) -> dict[str, Any]:
    import opacus

    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "malloc": allocator.describe(),
    }
    if device.type == "cuda":
        env.update(
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
    return env


def default_out(device: torch.device, model: str, method: str = "dpdm") -> Path:
    """benchmarks/results/<device>-<model> for DPDM, <device>-<method>-<model> for another method
    (.md and .json), <device> = `cpu` or the GPU's name."""
    name = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return Path("benchmarks") / "results" / (f"{name}-{model}" if method == "dpdm" else f"{name}-{method}-{model}")


def _check_settings(model: str, batch_size: int, noise_multiplicities: Sequence[int], modes: Sequence[str],
                    samplers: Sequence[str], sample_steps: int, sample_batch: int, repeats: int, warmup: int,
                    variants: Sequence[str], threads: int | None, physical_batch_size: int | None = None,
                    method: str = "dpdm", against: str | None = None) -> None:
    if method not in METHODS:
        raise BenchSettingsError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if against is not None and (against not in METHODS or against == method):
        raise BenchSettingsError(f"--against must be another method of {', '.join(METHODS)}, got {against!r}")
    if against is not None and not modes:
        raise BenchSettingsError("--against times the other method's DP step in the first of --modes: give one")
    if model not in MODELS:
        raise BenchSettingsError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    if batch_size < 1:
        raise BenchSettingsError(f"--batch-size must be >= 1, got {batch_size}")
    if physical_batch_size is not None and not 1 <= physical_batch_size <= batch_size:
        raise BenchSettingsError(
            f"--physical-batch-size must be in [1, --batch-size={batch_size}], got {physical_batch_size}")
    if not noise_multiplicities or min(noise_multiplicities) < 1:
        raise BenchSettingsError(
            f"--noise-multiplicity must be a list of integers >= 1, got {list(noise_multiplicities)}")
    bad = [m for m in modes if m not in GRAD_MODES]
    if bad:
        raise BenchSettingsError(f"--modes: unknown {bad}; choose from {', '.join(GRAD_MODES)}")
    bad = [s for s in samplers if s not in SAMPLERS]
    if bad:
        raise BenchSettingsError(f"--samplers: unknown {bad}; choose from {', '.join(SAMPLERS)}")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise BenchSettingsError(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
    if samplers and (sample_steps < 1 or sample_batch < 1):
        raise BenchSettingsError(
            f"--sample-steps and --sample-batch must be >= 1, got {sample_steps}, {sample_batch}")
    if repeats < 1 or warmup < 1:
        raise BenchSettingsError(f"--repeats and --warmup must be >= 1, got {repeats}, {warmup}")
    if threads is not None and threads < 1:
        raise BenchSettingsError(f"--threads must be >= 1, got {threads}")


NONPRIVATE = "non-private"


def dp_label(mode: str, variant: str | None = None) -> str:
    return f"DP {mode}" + (f" + {VARIANTS[variant]}" if variant else "")


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, after the rows finished so far were written."""


class VariantMismatch(RuntimeError):
    """A GPU variant computes different per-example gradients than eager fp32."""


def run_benchmark(
    model: str = "dpdm",
    batch_size: int = 64,
    noise_multiplicities: Sequence[int] = (1, 4, 8, 32),
    modes: Sequence[str] = GRAD_MODES,
    samplers: Sequence[str] = tuple(SAMPLERS),
    sample_steps: int = 20,
    sample_batch: int = 64,
    repeats: int = 5,
    warmup: int = 2,
    device: str = "auto",
    threads: int | None = None,
    out: str | Path | None = None,
    compare: str | Path | None = None,
    variants: Sequence[str] | None = None,
    seed: int = 0,
    verbose: bool = True,
    physical_batch_size: int | None = None,
    method: str = "dpdm",
    overrides: Sequence[str] = (),
    against: str | None = None,
) -> dict[str, Any]:
    """Times everything (see the module docstring), writes `out`.md / .json, prints the tables; returns the results.

    `variants=None`: bf16 / channels-last / torch.compile rows on CUDA, none on CPU.
    `out=None`: `default_out(device, model, method)`. `threads` applies for this call only.
    `physical_batch_size`: examples per forward/backward chunk in every training row (default: the whole
    batch); large K needs it to fit in memory. `method`: conf/method/<method>.yaml; `overrides`: Hydra
    overrides (key=value) of the composed config, applied after the bench's own (`BENCH_OVERRIDES`).
    `against`: another method whose DP step is timed beside this one's (its own config, without `overrides`).
    """
    dev = resolve_device(device)
    if variants is None:
        variants = tuple(VARIANTS) if dev.type == "cuda" else ()
    noise_multiplicities = sorted({int(k) for k in noise_multiplicities})
    _check_settings(model, batch_size, noise_multiplicities, modes, samplers, sample_steps, sample_batch, repeats,
                    warmup, variants, threads, physical_batch_size, method, against)
    previous = None
    if compare is not None:
        with open(compare) as f:
            previous = json.load(f)
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    train_rows: list[dict[str, Any]] = []
    sample_rows: list[dict[str, Any]] = []
    interrupted = None
    try:
        bench = _Benchmark(model, batch_size, dev, repeats, warmup, seed, verbose, physical_batch_size,
                           method=method, overrides=overrides, against=against)
        try:
            for k in noise_multiplicities:
                train_rows += bench.training_rows(k, modes, variants)
            for name in samplers:
                sample_rows.append(bench.sampling_row(name, sample_steps, sample_batch))
        except KeyboardInterrupt:
            # A long run stopped by hand keeps what it finished: every K done, every sampler done.
            done = sorted({r["K"] for r in train_rows})
            interrupted = (f"interrupted (Ctrl-C): training rows for K in {done or 'none'} of "
                           f"{noise_multiplicities}, {len(sample_rows)} of {len(samplers)} samplers")
        _add_ratios(train_rows)
        env = environment(dev)
    finally:
        torch.set_num_threads(threads_before)

    result: dict[str, Any] = {
        "env": env,
        "settings": {
            "method": method, "against": against, "model": model, "overrides": list(overrides),
            "num_params": bench.num_params,
            "batch_size": batch_size,
            "physical_batch_size": bench.physical_batch_size,
            "noise_multiplicities": noise_multiplicities, "modes": list(modes), "samplers": list(samplers),
            "sample_steps": sample_steps, "sample_batch": sample_batch, "repeats": repeats, "warmup": warmup,
            "variants": list(variants), "seed": seed, "memory": bench.memory.label,
        },
        "notes": bench.notes(variants),
        "train": train_rows,
        "sample": sample_rows,
    }
    if interrupted:
        result["interrupted"] = interrupted
    if previous is not None:
        result["compare"] = {"against": str(compare), "env": previous.get("env", {}),
                             "settings": previous.get("settings", {}), "rows": compare_rows(result, previous)}
    markdown = to_markdown(result)
    out_base = default_out(dev, model, method) if out is None else Path(out)
    if out_base.suffix in (".md", ".json"):
        out_base = out_base.with_suffix("")
    out_base.parent.mkdir(parents=True, exist_ok=True)
    md_path, json_path = Path(f"{out_base}.md"), Path(f"{out_base}.json")
    result["paths"] = {"markdown": str(md_path), "json": str(json_path)}
    md_path.write_text(markdown)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2, default=str)
        f.write("\n")
    if verbose:
        print(markdown)
        print(f"wrote {md_path} and {json_path}")
    if interrupted:
        raise BenchInterrupted(f"{interrupted}; wrote them to {md_path} and {json_path}")
    return result


class _Benchmark:
    """One method, model and device; builds each row's module from the composed config and times its step."""

    def __init__(self, model: str, batch_size: int, device: torch.device, repeats: int, warmup: int, seed: int,
                 verbose: bool, physical_batch_size: int | None = None, method: str = "dpdm",
                 overrides: Sequence[str] = (), against: str | None = None) -> None:
        self.method, self.model, self.batch_size, self.device = method, model, batch_size, device
        self.against = against
        self.against_config = None if against is None else compose_config(against, model)
        self.physical_batch_size = physical_batch_size or batch_size
        self.repeats, self.warmup, self.seed, self.verbose = repeats, warmup, seed, verbose
        self.overrides = list(overrides)
        self.config = compose_config(method, model, overrides)
        self.info = dataset_info(self.config.data.name)
        # The non-private twin at K=1: the weights every row starts from (the same seed builds the same
        # weights), counted, checked for grad samplers, sampled from and copied as the fp32 reference of
        # a variant's gradient check; never trained, hooked or compiled itself.
        self.template = build_module(self.row_config(1, None), device)
        self.parts = self.template.private_parts()
        self.num_params = sum(p.numel() for part in self.parts.values() for p in trainable_parameters(part).values())
        self.grouped_ok = all(supports(part) for part in self.parts.values())
        self.num_classes = int(getattr(self.template, "num_classes", 0))
        self.memory = PeakMemory(device)

    def row_config(self, k: int, mode: str | None) -> DictConfig:
        return row_config(self.config, self.batch_size, self.physical_batch_size, k, mode, self.seed)

    def progress(self, text: str) -> None:
        if self.verbose:
            print(f"[bench] {text}", file=sys.stderr, flush=True)

    def notes(self, variants: Sequence[str]) -> list[str]:
        cfg, info = self.config, self.info
        overrides = [f"method={self.method}", f"model={self.model}", *BENCH_OVERRIDES, *self.overrides]
        notes = [
            f"method: {self.method} ({type(self.template).__name__}, conf/method/{self.method}.yaml), built by "
            f"build_method from conf/ with overrides {' '.join(overrides)}",
            f"private parts: {', '.join(f'{name} ({type(part).__name__})' for name, part in self.parts.items())}, "
            f"{self.num_params:,} trainable parameters (P); model={self.model} (conf/model/{self.model}.yaml) "
            f"where the method's parts use it; {info.name} shape {tuple(info.image_shape)}, {self.num_classes} "
            "classes; "
            f"{cfg.diffusion._target_.rsplit('.', 1)[-1]} loss; "
            "weights: init + N(0, 0.01^2) so no gradient is identically zero",
            "every row: the module's prepare_batch (the K noise draws) then private_step per private part, as "
            "training_step calls them (no trainer, no EMA update, no logging)",
            f"non-private: the same module with privacy.enabled=false: forward + backward + Adam on the mean "
            f"loss of B={self.batch_size} examples x K draws (B*K rows)" + self._chunk_note(),
            f"DP: the engine's step{self._chunk_note()}: per-example gradients, clipping "
            f"(C={MAX_GRAD_NORM}), Gaussian noise (sigma={NOISE_MULTIPLIER}) by Opacus's DPOptimizer, Adam",
            "per-example grads (per chunk): rows = examples (grouped, functorch) or examples x K (opacus, summed "
            "afterwards) x P; ghost: examples x the largest layer (norms only, then a second backward of the "
            "clip-weighted loss; Opacus's DPOptimizerFastGradientClipping adds the noise)",
            f"timing: median of {self.repeats} calls after {self.warmup} warm-up calls"
            + (", torch.cuda.synchronize() after each" if self.device.type == "cuda" else "")
            + "; training rows of one K timed round-robin (one call of each row per round), sampling rows in turn",
            f"memory: {self.memory.label}; training rows: of one more untimed call after the warm-up",
        ]
        if variants:
            limits = ", ".join(f"{VARIANTS[v]} {VARIANT_TOLERANCE[v]:g}" for v in variants)
            notes.append("variant DP rows are timed only if their per-example gradients match eager fp32 "
                         f"(relative error at most: {limits})")
        elif self.device.type != "cuda":
            notes.append("bf16 autocast / channels-last / torch.compile rows are CUDA-only: skipped on CPU")
        return notes

    def _chunk_note(self) -> str:
        if self.physical_batch_size >= self.batch_size:
            return ", one chunk"
        chunks = math.ceil(self.batch_size / self.physical_batch_size)
        return f", in {chunks} chunks of {self.physical_batch_size} examples (gradients accumulated)"

    def per_example_numel(self, mode: str, k: int) -> int:
        """Per-example gradient elements held at once: chunk rows x P, or x the largest layer (ghost)."""
        if mode == "ghost":  # one layer's per-example gradient at a time, freed after its norm
            largest = max(sum(p.numel() for p in layer.parameters(recurse=False) if p.requires_grad)
                          for part in self.parts.values() for layer in part.modules())
            return self.physical_batch_size * largest
        return self.physical_batch_size * (k if mode == "opacus" else 1) * self.num_params

    # --- training rows --------------------------------------------------------------------------
    def training_rows(self, k: int, modes: Sequence[str], variants: Sequence[str]) -> list[dict[str, Any]]:
        """The non-private baseline at K, each DP mode at K, then each variant of both.

        All rows of one K are built and warmed up first, then timed round-robin (one call of each
        row per round), so a drift in machine speed (other tenants, clocks) hits every row alike
        and the ratios against the non-private step stay comparable.
        """
        batch = make_batch(self.config, self.batch_size, self.device, self.seed)
        if "compile" in variants:
            # Once per K, before any row is built: a reset between building a compiled row and
            # timing it would make its first timed call compile again.
            torch._dynamo.reset()
        prepared = [self.prepare_row(NONPRIVATE, k, lambda: self.nonprivate(batch, k, None))]
        for mode in modes:
            numel = self.per_example_numel(mode, k)
            if mode in NEEDS_GRAD_SAMPLERS and not self.grouped_ok:
                row = _new_row(dp_label(mode), k, mode, None, numel)
                row["note"] = f"skipped: the model has layers without a grad sampler for {mode} mode"
                prepared.append((row, None))
                continue
            prepared.append(self.prepare_row(dp_label(mode), k, lambda m=mode: self.private(batch, m, k, None),
                                             mode=mode, per_example_numel=numel))
        if self.against is not None:
            mode = modes[0]
            prepared.append(self.prepare_row(self.against_label(mode), k, lambda: self.against_step(mode, k),
                                             mode=mode))
        for variant in variants:
            prepared.append(self.prepare_row(f"{NONPRIVATE} + {VARIANTS[variant]}", k,
                                             lambda v=variant: self.nonprivate(batch, k, v), variant=variant))
            if self.grouped_ok:
                prepared.append(self.prepare_row(dp_label("grouped", variant), k,
                                                 lambda v=variant: self.private(batch, "grouped", k, v),
                                                 mode="grouped", variant=variant,
                                                 per_example_numel=self.physical_batch_size * self.num_params))
        self.progress(f"timing {sum(step is not None for _, step in prepared)} rows at K={k}, "
                      f"{self.repeats} rounds")
        try:
            self.time_round_robin(prepared)
            self.note_against([row for row, _ in prepared], modes)
        finally:
            rows = [row for row, _ in prepared]
            prepared.clear()  # drop the rows' models, optimizers and engines before the next K
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return rows

    def prepare_row(self, what: str, k: int, build: Callable[[], tuple[Callable[[], Any], str]],
                    mode: str | None = None, variant: str | None = None,
                    per_example_numel: int | None = None) -> tuple[dict[str, Any], Callable[[], Any] | None]:
        """Build a step (fresh model copy), warm it up and take its peak memory on one more untimed call.

        A variant's failure or any out-of-memory skips the row (its step is None).
        """
        self.progress(f"{what}, K={k}")
        row = _new_row(what, k, mode, variant, per_example_numel)
        torch.manual_seed(self.seed)  # the same diffusion draws in every row
        step = None
        try:
            start = time.perf_counter()
            step, row["note"] = build()
            row["setup_ms"] = (time.perf_counter() - start) * 1e3  # includes a variant's gradient check
            row.update(warm_up(step, self.device, self.warmup, self.memory))
        except VariantMismatch as err:
            row["note"], step = f"skipped: {err}", None
        except Exception as err:  # noqa: BLE001 - one failing row must not lose the others
            step = None
            if _is_oom(err):
                row["note"] = "skipped: out of memory"
            elif isinstance(err, PrivacyError):  # the mode cannot handle this model (said in one line)
                row["note"] = f"skipped: {_first_line(err)}"
            elif variant is None:
                raise
            else:
                row["note"] = f"skipped: {_first_line(err)}"
        if variant == "compile" and row["first_call_ms"] is not None:
            compile_s = (row["setup_ms"] + row["first_call_ms"]) / 1e3
            row["note"] = _join(row["note"], f"setup + first call (compiles): {compile_s:.1f} s")
        return row, step

    def time_round_robin(self, prepared: list[tuple[dict[str, Any], Callable[[], Any] | None]]) -> None:
        """`repeats` rounds of one timed call per live row; each row's `ms` is the median of its calls."""
        live = [(row, step) for row, step in prepared if step is not None]
        for _ in range(self.repeats):
            for row, step in list(live):
                try:
                    start = time.perf_counter()
                    step()
                    _sync(self.device)
                    row["times_ms"].append((time.perf_counter() - start) * 1e3)
                except Exception as err:  # noqa: BLE001
                    if not _is_oom(err):
                        raise
                    row["note"] = _join(row["note"], "skipped: out of memory")
                    row["times_ms"] = []
                    live = [entry for entry in live if entry[0] is not row]
        for row, _ in live:
            row["ms"] = statistics.median(row["times_ms"])

    def against_label(self, mode: str) -> str:
        return f"{self.against}: {dp_label(mode)}"

    def against_step(self, mode: str, k: int) -> tuple[Callable[[], Any], str]:
        """The other method's DP step (its module from its own config, same model, B, K, mode and seed)."""
        cfg = row_config(self.against_config, self.batch_size, self.physical_batch_size, k, mode, self.seed)
        module = build_module(cfg, self.device)
        batch = make_batch(self.against_config, self.batch_size, self.device, self.seed)
        return timed_step(module, batch, part_losses(module, self.device)), ""

    def note_against(self, rows: list[dict[str, Any]], modes: Sequence[str]) -> None:
        """On the --against row: this method's DP step (same mode) over the other method's."""
        if self.against is None:
            return
        ours = next((r for r in rows if r["what"] == dp_label(modes[0])), None)
        theirs = next((r for r in rows if r["what"] == self.against_label(modes[0])), None)
        if ours and theirs and ours.get("ms") and theirs.get("ms"):
            ratio = ours["ms"] / theirs["ms"]
            theirs["vs_method"] = ratio
            theirs["note"] = _join(theirs["note"], f"{self.method} {dp_label(modes[0])} / this: {ratio:.2f}x")

    def nonprivate(self, batch: Any, k: int, variant: str | None) -> tuple[Callable[[], Any], str]:
        module = build_module(self.row_config(k, None), self.device, variant)
        vbatch = make_batch(self.config, self.batch_size, self.device, self.seed, variant)
        return timed_step(module, vbatch, part_losses(module, self.device, variant)), ""

    def private(self, batch: Any, mode: str, k: int, variant: str | None) -> tuple[Callable[[], Any], str]:
        module = build_module(self.row_config(k, mode), self.device, variant)
        vbatch = make_batch(self.config, self.batch_size, self.device, self.seed, variant)
        losses = part_losses(module, self.device, variant)
        note = ""
        if variant is not None:
            # The variant's per-example gradients vs eager fp32 ones, same weights and draws.
            prepared = module.prepare_batch(batch)
            vprepared = prepared if variant != "channels_last" else tree_map(_channels_last, prepared)
            eager = part_losses(module, self.device)
            got, want = {}, {}
            for part, loss_fn in losses.items():
                engine: PrivateOptimization = module.engine(part)  # the part's engine, as private_step uses it
                grads, _ = engine.gradients(loss_fn, vprepared)
                got.update({f"{part}.{name}": g for name, g in grads.items()})
                reference = make_per_example_gradients(copy.deepcopy(self.parts[part]), mode)
                grads, _ = reference(eager[part], prepared)
                want.update({f"{part}.{name}": g for name, g in grads.items()})
            error, lost = gradient_error(got, want)
            if error > VARIANT_TOLERANCE[variant] or lost:
                raise VariantMismatch(
                    f"per-example gradients under {VARIANTS[variant]} differ from eager fp32 (relative error "
                    f"{error:.2g}; {lost} of {len(want)} tensors all zero)")
            note = f"per-example grads vs eager fp32: rel. err. {error:.1g}"
        return timed_step(module, vbatch, losses), note

    # --- sampling -------------------------------------------------------------------------------
    def sampling_row(self, sampler: str, steps: int, batch: int) -> dict[str, Any]:
        """Images/s of `generate` for one batch with the raw denoiser (the private part, eval mode)."""
        self.progress(f"sampling {sampler}, {steps} steps, batch {batch}")
        row: dict[str, Any] = {"id": f"sample {sampler} steps={steps}", "sampler": sampler, "steps": steps,
                               "batch": batch, "nfe": None, "ms": None, "times_ms": [], "first_call_ms": None,
                               "peak_mib": None, "images_per_s": None, "note": ""}
        if len(self.parts) != 1:
            row["note"] = f"skipped: {len(self.parts)} private parts, none of them alone is the denoiser"
            return row
        (denoiser,) = (copy.deepcopy(part).eval() for part in self.parts.values())
        calls = 0

        def counted(*args: Any, **kwargs: Any) -> Tensor:
            nonlocal calls
            calls += 1
            return denoiser(*args, **kwargs)

        def run(net: Callable[..., Tensor]) -> None:
            generate(net, batch, tuple(self.info.image_shape), batch, sampler=sampler, num_steps=steps,
                     device=self.device, num_classes=self.num_classes, seed=self.seed, disable=True)

        try:
            run(counted)  # counts denoiser evaluations (and warms up)
            row["nfe"] = calls
            row.update(time_calls(lambda: run(denoiser), self.device, self.warmup, self.repeats, self.memory))
            row["images_per_s"] = batch / (row["ms"] / 1e3)
        except Exception as err:  # noqa: BLE001
            if not _is_oom(err):
                raise
            row["note"] = "skipped: out of memory"
        return row


def _new_row(what: str, k: int, mode: str | None, variant: str | None,
             per_example_numel: int | None) -> dict[str, Any]:
    return {
        "id": f"{what} K={k}", "what": what, "K": k, "mode": mode, "variant": variant,
        "ms": None, "times_ms": [], "first_call_ms": None, "setup_ms": None, "peak_mib": None, "note": "",
        # Per-example gradients held at once, fp32.
        "per_example_grad_mib": None if per_example_numel is None else per_example_numel * 4 / 2**20,
    }


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """ratio: ms / non-private fp32 ms at the same K; vs_k_min: ms / the same row's ms at the smallest K."""
    baseline = {r["K"]: r["ms"] for r in rows if r["what"] == NONPRIVATE}
    k_min = min(r["K"] for r in rows) if rows else None
    first = {r["what"]: r["ms"] for r in rows if r["K"] == k_min}
    for r in rows:
        base, ref = baseline.get(r["K"]), first.get(r["what"])
        r["ratio"] = r["ms"] / base if r["ms"] is not None and base else None
        r["vs_k_min"] = r["ms"] / ref if r["ms"] is not None and ref else None


# --- reporting ------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}{suffix}"
    if abs(value) >= 10:
        return f"{value:.1f}{suffix}"
    return f"{value:.{digits}f}{suffix}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(result: dict[str, Any]) -> str:
    env, settings = result["env"], result["settings"]
    k_min = min(settings["noise_multiplicities"])
    parts = [
        f"# DP-SGD cost: {settings.get('method', 'dpdm')}, {settings['model']} model, B={settings['batch_size']}"
        + (f" in chunks of {settings['physical_batch_size']}"
           if settings.get("physical_batch_size", settings["batch_size"]) < settings["batch_size"] else "")
        + f", {env['device_name']}",
        "",
        f"{env['date']} | torch {env['torch']} | opacus {env['opacus']} | {env['device']} | "
        f"{env['threads']} threads",
        "",
        "## Training step",
        "",
        _table(
            ["what", "K", "ms/step", "x non-private (same K)", f"x K={k_min}",
             "per-example grads MiB (held at once, 4 B each)", settings["memory"], "notes"],
            [[r["what"], str(r["K"]), _fmt(r["ms"]), _fmt(r["ratio"], suffix="x"), _fmt(r["vs_k_min"], suffix="x"),
              _fmt(r["per_example_grad_mib"], 1), _fmt(r["peak_mib"], 1), r["note"]] for r in result["train"]],
        ),
    ]
    if result["sample"]:
        parts += [
            "",
            "## Sampling (raw denoiser, no EMA)",
            "",
            _table(
                ["sampler", "steps", "NFE", "batch", "ms/batch", "images/s", settings["memory"], "notes"],
                [[r["sampler"], str(r["steps"]), str(r.get("nfe", "-")), str(r["batch"]), _fmt(r["ms"]),
                  _fmt(r.get("images_per_s"), 1), _fmt(r["peak_mib"], 1), r["note"]] for r in result["sample"]],
            ),
        ]
    if result.get("interrupted"):
        parts[1:1] = ["", f"**Partial results**, {result['interrupted']}."]
    parts += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    parts += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()]
    if "compare" in result:
        parts += ["", compare_markdown(result["compare"], env, settings)]
    return "\n".join(parts) + "\n"


def compare_rows(now: dict[str, Any], then: dict[str, Any]) -> list[dict[str, Any]]:
    """Per row id (training and sampling): ms then, ms now, and now / then."""
    before = {r["id"]: r.get("ms") for r in then.get("train", []) + then.get("sample", [])}
    rows = []
    for r in now["train"] + now["sample"]:
        old = before.get(r["id"])
        ratio = r["ms"] / old if r["ms"] is not None and old else None
        rows.append({"id": r["id"], "then_ms": old, "now_ms": r["ms"], "now_over_then": ratio})
    return rows


def compare_markdown(compare: dict[str, Any], env: dict[str, Any], settings: dict[str, Any]) -> str:
    then = compare["env"]
    lines = [f"## Compared with {compare['against']}", ""]
    lines.append(f"then: {then.get('date', '?')}, {then.get('device_name', '?')}, torch {then.get('torch', '?')}, "
                 f"{then.get('threads', '?')} threads")
    differ = [k for k in ("device_name", "torch", "opacus", "threads") if then.get(k) != env.get(k)]
    # Absent from older results: one chunk, DPDM, no overrides.
    then_settings = {"physical_batch_size": compare.get("settings", {}).get("batch_size"), "method": "dpdm",
                     "overrides": [], **compare.get("settings", {})}
    differ += [k for k in ("method", "model", "overrides", "batch_size", "physical_batch_size", "sample_batch",
                           "repeats", "warmup")
               if then_settings.get(k) != settings.get(k)]
    if differ:
        lines.append(f"(environment or settings differ in: {', '.join(differ)})")
    lines.append("")
    lines.append(_table(["row", "then ms", "now ms", "now / then"],
                        [[r["id"], _fmt(r["then_ms"]), _fmt(r["now_ms"]), _fmt(r["now_over_then"], suffix="x")]
                         for r in compare["rows"]]))
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------------
def _list(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        if text.strip().lower() in ("", "none"):
            return []
        try:
            return [kind(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from err

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dp-diffusion bench",
        description="Time the DP-SGD step against the non-private step (same model, batch, device), "
                    "per per-example gradient mode and noise multiplicity K, and sampling throughput.",
    )
    p.add_argument("--method", choices=METHODS, default="dpdm",
                   help="method config in conf/method/ whose private step is timed (default: dpdm)")
    p.add_argument("--against", choices=METHODS, default=None,
                   help="another method whose DP step (first of --modes) is timed beside this one's, e.g. "
                        "--method dp_sad --against dpdm: one step of each at the same batch")
    p.add_argument("--model", choices=MODELS, default="dpdm", help="model config in conf/model/ (default: dpdm)")
    p.add_argument("--batch-size", type=int, default=64, help="examples B per step (default: 64)")
    p.add_argument("--physical-batch-size", type=int, default=None,
                   help="examples per forward/backward chunk, gradients accumulated over chunks, in every "
                        "training row (default: B, one chunk); lets K=32 fit in memory")
    p.add_argument("--noise-multiplicity", type=_list(int), default=[1, 4, 8, 32],
                   help="comma-separated K values (default: 1,4,8,32)")
    p.add_argument("--modes", type=_list(str), default=list(GRAD_MODES),
                   help="per-example gradient modes (default: grouped,functorch,opacus,ghost; 'none' for baselines only)")
    p.add_argument("--samplers", type=_list(str), default=list(SAMPLERS),
                   help="samplers to time (default: ddim,ddim_stochastic,edm; 'none' to skip sampling)")
    p.add_argument("--sample-steps", type=int, default=20, help="sampler steps (default: 20)")
    p.add_argument("--sample-batch", type=int, default=64, help="images per sampling batch (default: 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per row; the median is reported (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (default: 2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--variants", default="auto",
                   help="extra rows: auto (bf16,channels_last,compile on CUDA, none on CPU), none, or a list")
    p.add_argument("--out", default=None,
                   help="output path without suffix; writes .md and .json "
                        "(default: benchmarks/results/<device>-<model>)")
    p.add_argument("--compare", default=None, metavar="PREVIOUS.json",
                   help="an earlier run's JSON: adds each row's time now / then")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="Hydra override of the composed config, as for `dp-diffusion train` (repeatable), e.g. "
                        "--override method.module.variant=finetune; the options above set batch, K, mode and seed")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> None:
    """`python -m dp_diffusion.bench ...` and `dp-diffusion bench ...`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    allocator.keep_freed_memory()  # also for `python -m dp_diffusion.bench`
    variants = None if args.variants.strip().lower() == "auto" else _list(str)(args.variants)
    if args.compare is not None and not Path(args.compare).is_file():
        parser.error(f"--compare: no such file {args.compare!r}")
    try:
        run_benchmark(
            model=args.model, batch_size=args.batch_size, noise_multiplicities=args.noise_multiplicity,
            modes=args.modes, samplers=args.samplers, sample_steps=args.sample_steps,
            sample_batch=args.sample_batch, repeats=args.repeats, warmup=args.warmup, device=args.device,
            threads=args.threads, out=args.out, compare=args.compare, variants=variants, seed=args.seed,
            physical_batch_size=args.physical_batch_size, method=args.method, overrides=args.override,
            against=args.against,
        )
    except BenchSettingsError as err:
        parser.error(str(err))
    except BenchInterrupted as err:
        print(f"dp-diffusion bench: {err}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
