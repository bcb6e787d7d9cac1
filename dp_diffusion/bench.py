"""What DP-SGD costs over ordinary training, measured in one run (DESIGN.md, Performance).

On one model, one batch and one device this times

1. the non-private step: forward + backward + Adam on the mean per-example
   loss of B examples with K noise draws each (B*K rows): the baseline;
2. the DP step, `PrivateOptimization.step` (one physical chunk of B unless
   `--physical-batch-size`), for each per-example gradient mode (grouped,
   functorch, opacus, ghost clipping) and each noise
   multiplicity K; the baseline is re-timed at every K (its work grows with K
   too) and every DP row is divided by the baseline at the same K;
3. sampling throughput of each sampler with the raw (EMA-free) denoiser;
4. on CUDA (on CPU with `--variants`), the non-private and grouped DP steps
   again under bf16 autocast, channels-last and torch.compile (a DP variant
   is timed only if its per-example gradients match eager fp32 ones; hooks
   and compilers can silently disagree). The grouped mode's layer hooks
   cannot see inside a compiled model, so its compile row is reported as
   skipped, with that reason.

Every call is timed after warm-up calls, with `torch.cuda.synchronize()` on
CUDA, and the median of `repeats` is reported. Writes a Markdown table and the
raw numbers as JSON; `--compare OLD.json` adds the ratio now / then per row.

    python -m dp_diffusion.bench --model tiny --batch-size 8 --repeats 2
    dp-diffusion bench --device cuda --compare benchmarks/results/old.json
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
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from dp_diffusion import allocator
from dp_diffusion.diffusion.losses import DiffusionLoss
from dp_diffusion.diffusion.samplers import SAMPLERS, generate
from dp_diffusion.privacy import PrivacyLedger, PrivacySpec, PrivateOptimization, make_plan
from dp_diffusion.privacy.engine import split_batch
from dp_diffusion.privacy.grad_samplers import supports
from dp_diffusion.privacy.per_example import batch_size_of, make_per_example_gradients, trainable_parameters

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
MODELS = ("tiny", "dpdm")
GRAD_MODES = ("grouped", "functorch", "opacus", "ghost")
NEEDS_GRAD_SAMPLERS = ("grouped", "ghost")  # modes built on privacy/grad_samplers.py
VARIANTS = {"bf16": "bf16 autocast", "channels_last": "channels-last", "compile": "torch.compile"}
# MNIST-shaped data, as for the default DPDM UNet (conf/model/dpdm.yaml).
IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
LR = 3e-4  # PrivateDiffusion's default Adam learning rate
NOISE_MULTIPLIER = 1.0  # any sigma > 0 costs the same; accounting is not timed
MAX_GRAD_NORM = 1.0
NUM_EXAMPLES = 60_000  # only sets the sample rate q = B / N of the plan
# Largest relative error ||g - g_eager|| / ||g_eager|| of the per-example
# gradients a DP variant may have and still be timed.
VARIANT_TOLERANCE = {"bf16": 0.1, "channels_last": 1e-3, "compile": 1e-3}


class BenchSettingsError(ValueError):
    """A benchmark setting the user must change (the message names the option)."""


# --- building blocks ------------------------------------------------------------------------------
def build_denoiser(model: str, seed: int = 0) -> tuple[nn.Module, DiffusionLoss]:
    """The preconditioned UNet of `conf/model/<model>.yaml` for MNIST, and the EDM loss of `conf/diffusion/edm.yaml`.

    DDPM++ zero-initialises every residual branch's last conv and the output
    conv, so at init almost every gradient is exactly zero; all weights get
    N(0, 0.01^2) added so the timed (and checked) gradients are generic.
    """
    torch.manual_seed(seed)
    channels, height, _ = IMAGE_SHAPE
    backbone = instantiate(
        OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml"),
        in_channels=channels, out_channels=channels, resolution=height, num_classes=NUM_CLASSES,
    )
    loss = instantiate(OmegaConf.load(CONF_DIR / "diffusion" / "edm.yaml"), num_classes=NUM_CLASSES)
    denoiser = loss.precondition(backbone)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in denoiser.parameters():
            p.add_(torch.randn(p.shape, generator=generator), alpha=0.01)
    return denoiser, loss


def make_batch(loss: DiffusionLoss, batch_size: int, noise_multiplicity: int, device: torch.device,
               seed: int = 0) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(images, labels, draw): the same B images and labels at every K, with K noise draws each."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand((batch_size, *IMAGE_SHAPE), generator=generator) * 2 - 1
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
    draw = loss.draw(images, labels, noise_multiplicity, generator=generator)
    return images.to(device), labels.to(device), {k: v.to(device) for k, v in draw.items()}


def _autocast(device: torch.device, variant: str | None):
    if variant == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _apply_variant(denoiser: nn.Module, batch: Any, variant: str | None) -> tuple[nn.Module, Any]:
    """A fresh copy of `denoiser` (and the batch) set up for `variant`; never touches the template."""
    denoiser = copy.deepcopy(denoiser)
    if variant == "channels_last":
        images, labels, draw = batch
        denoiser = denoiser.to(memory_format=torch.channels_last)
        batch = (images.contiguous(memory_format=torch.channels_last), labels, draw)
    elif variant == "compile":
        denoiser.compile()  # in place: parameter names (and state_dict keys) unchanged
    return denoiser, batch


def per_example_loss_fn(loss: DiffusionLoss, device: torch.device, variant: str | None = None):
    """The engine's per-example loss for batches (images, labels, draw), under the variant's autocast."""

    def loss_fn(model: Any, batch: Any) -> Tensor:
        with _autocast(device, variant):
            return loss(model, batch[0], batch[1], batch[2])

    return loss_fn


def nonprivate_step(denoiser: nn.Module, loss: DiffusionLoss, batch: Any, device: torch.device,
                    variant: str | None = None, physical_batch_size: int | None = None) -> Callable[[], None]:
    """Forward + backward + Adam on the mean per-example loss: the limit DP-SGD is measured against.

    With `physical_batch_size`, gradients accumulate over the same chunks the DP step uses.
    """
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=LR)
    loss_fn = per_example_loss_fn(loss, device, variant)
    size = batch_size_of(batch)
    chunks = split_batch(batch, physical_batch_size or size)

    def step() -> None:
        for chunk in chunks:
            (loss_fn(denoiser, chunk).sum() / size).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def private_engine(denoiser: nn.Module, mode: str, batch_size: int, noise_multiplicity: int,
                   physical_batch_size: int | None = None) -> PrivateOptimization:
    """`PrivateOptimization` for one logical batch of `batch_size` in chunks of `physical_batch_size` (default: one)."""
    spec = PrivacySpec(enabled=True, noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
                       noise_multiplicity=noise_multiplicity, grad_mode=mode, accountant="rdp")
    plan = make_plan(spec, num_examples=NUM_EXAMPLES, batch_size=batch_size, steps=1000)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=LR)
    return PrivateOptimization(denoiser, optimizer, spec, plan, PrivacyLedger(delta=spec.delta, accountant="rdp"),
                               physical_batch_size=physical_batch_size or batch_size)


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


def default_out(device: torch.device, model: str) -> Path:
    """benchmarks/results/<device>-<model> (.md and .json), <device> = `cpu` or the GPU's name."""
    name = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return Path("benchmarks") / "results" / f"{name}-{model}"


def _check_settings(model: str, batch_size: int, noise_multiplicities: Sequence[int], modes: Sequence[str],
                    samplers: Sequence[str], sample_steps: int, sample_batch: int, repeats: int, warmup: int,
                    variants: Sequence[str], threads: int | None, physical_batch_size: int | None = None) -> None:
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
) -> dict[str, Any]:
    """Times everything (see the module docstring), writes `out`.md / .json, prints the tables; returns the results.

    `variants=None`: bf16 / channels-last / torch.compile rows on CUDA, none on CPU.
    `out=None`: `default_out(device, model)`. `threads` applies for this call only.
    `physical_batch_size`: examples per forward/backward chunk in every training row (default: the whole
    batch); large K needs it to fit in memory.
    """
    dev = resolve_device(device)
    if variants is None:
        variants = tuple(VARIANTS) if dev.type == "cuda" else ()
    noise_multiplicities = sorted({int(k) for k in noise_multiplicities})
    _check_settings(model, batch_size, noise_multiplicities, modes, samplers, sample_steps, sample_batch, repeats,
                    warmup, variants, threads, physical_batch_size)
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
        bench = _Benchmark(model, batch_size, dev, repeats, warmup, seed, verbose, physical_batch_size)
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
            "model": model, "num_params": bench.num_params, "batch_size": batch_size,
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
    out_base = default_out(dev, model) if out is None else Path(out)
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
    """One model, loss and device; builds and times each row on a fresh copy of the model."""

    def __init__(self, model: str, batch_size: int, device: torch.device, repeats: int, warmup: int, seed: int,
                 verbose: bool, physical_batch_size: int | None = None) -> None:
        self.model, self.batch_size, self.device = model, batch_size, device
        self.physical_batch_size = physical_batch_size or batch_size
        self.repeats, self.warmup, self.seed, self.verbose = repeats, warmup, seed, verbose
        template, self.loss = build_denoiser(model, seed)
        # Never trained, hooked or compiled itself: every row deep-copies it.
        self.template = template.to(device)
        self.num_params = sum(p.numel() for p in trainable_parameters(self.template).values())
        self.grouped_ok = supports(self.template)
        self.memory = PeakMemory(device)

    def progress(self, text: str) -> None:
        if self.verbose:
            print(f"[bench] {text}", file=sys.stderr, flush=True)

    def notes(self, variants: Sequence[str]) -> list[str]:
        notes = [
            f"model: {self.model} UNet (conf/model/{self.model}.yaml), {self.num_params:,} parameters (P), "
            f"MNIST shape {IMAGE_SHAPE}, {NUM_CLASSES} classes; EDM loss (conf/diffusion/edm.yaml); "
            "weights: init + N(0, 0.01^2) so no gradient is identically zero",
            f"non-private: forward + backward + Adam on the mean loss of B={self.batch_size} examples "
            "x K draws (B*K rows)" + self._chunk_note(),
            f"DP: PrivateOptimization.step{self._chunk_note()}: per-example gradients, clipping "
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
                          for layer in self.template.modules())
            return self.physical_batch_size * largest
        return self.physical_batch_size * (k if mode == "opacus" else 1) * self.num_params

    # --- training rows --------------------------------------------------------------------------
    def training_rows(self, k: int, modes: Sequence[str], variants: Sequence[str]) -> list[dict[str, Any]]:
        """The non-private baseline at K, each DP mode at K, then each variant of both.

        All rows of one K are built and warmed up first, then timed round-robin (one call of each
        row per round), so a drift in machine speed (other tenants, clocks) hits every row alike
        and the ratios against the non-private step stay comparable.
        """
        batch = make_batch(self.loss, self.batch_size, k, self.device, self.seed)
        if "compile" in variants:
            # Once per K, before any row is built: a reset between building a compiled row and
            # timing it would make its first timed call compile again.
            torch._dynamo.reset()
        prepared = [self.prepare_row(NONPRIVATE, k, lambda: self.nonprivate(batch, None))]
        for mode in modes:
            numel = self.per_example_numel(mode, k)
            if mode in NEEDS_GRAD_SAMPLERS and not self.grouped_ok:
                row = _new_row(dp_label(mode), k, mode, None, numel)
                row["note"] = f"skipped: the model has layers without a grad sampler for {mode} mode"
                prepared.append((row, None))
                continue
            prepared.append(self.prepare_row(dp_label(mode), k, lambda m=mode: self.private(batch, m, k, None),
                                             mode=mode, per_example_numel=numel))
        for variant in variants:
            prepared.append(self.prepare_row(f"{NONPRIVATE} + {VARIANTS[variant]}", k,
                                             lambda v=variant: self.nonprivate(batch, v), variant=variant))
            if self.grouped_ok:
                prepared.append(self.prepare_row(dp_label("grouped", variant), k,
                                                 lambda v=variant: self.private(batch, "grouped", k, v),
                                                 mode="grouped", variant=variant,
                                                 per_example_numel=self.physical_batch_size * self.num_params))
        self.progress(f"timing {sum(step is not None for _, step in prepared)} rows at K={k}, "
                      f"{self.repeats} rounds")
        try:
            self.time_round_robin(prepared)
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
        torch.manual_seed(self.seed)  # the same DP noise stream in every row
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

    def nonprivate(self, batch: Any, variant: str | None) -> tuple[Callable[[], Any], str]:
        denoiser, batch = _apply_variant(self.template, batch, variant)
        return nonprivate_step(denoiser, self.loss, batch, self.device, variant, self.physical_batch_size), ""

    def private(self, batch: Any, mode: str, k: int, variant: str | None) -> tuple[Callable[[], Any], str]:
        denoiser, vbatch = _apply_variant(self.template, batch, variant)
        engine = private_engine(denoiser, mode, self.batch_size, k, self.physical_batch_size)
        loss_fn = per_example_loss_fn(self.loss, self.device, variant)
        note = ""
        if variant is not None:
            # The variant's per-example gradients vs eager fp32 ones, same weights and batch.
            got, _ = engine.gradients(loss_fn, vbatch)
            reference = make_per_example_gradients(copy.deepcopy(self.template), mode)
            want, _ = reference(per_example_loss_fn(self.loss, self.device), batch)
            error, lost = gradient_error(got, want)
            if error > VARIANT_TOLERANCE[variant] or lost:
                raise VariantMismatch(
                    f"per-example gradients under {VARIANTS[variant]} differ from eager fp32 (relative error "
                    f"{error:.2g}; {lost} of {len(want)} tensors all zero)")
            note = f"per-example grads vs eager fp32: rel. err. {error:.1g}"
        return (lambda: engine.step(loss_fn, vbatch)), note

    # --- sampling -------------------------------------------------------------------------------
    def sampling_row(self, sampler: str, steps: int, batch: int) -> dict[str, Any]:
        """Images/s of `generate` for one batch with the raw denoiser (eval mode)."""
        self.progress(f"sampling {sampler}, {steps} steps, batch {batch}")
        denoiser = copy.deepcopy(self.template).eval()
        calls = 0

        def counted(*args: Any, **kwargs: Any) -> Tensor:
            nonlocal calls
            calls += 1
            return denoiser(*args, **kwargs)

        def run(net: Callable[..., Tensor]) -> None:
            generate(net, batch, IMAGE_SHAPE, batch, sampler=sampler, num_steps=steps, device=self.device,
                     num_classes=NUM_CLASSES, seed=self.seed, disable=True)

        row: dict[str, Any] = {"id": f"sample {sampler} steps={steps}", "sampler": sampler, "steps": steps,
                               "batch": batch, "nfe": None, "ms": None, "times_ms": [], "first_call_ms": None,
                               "peak_mib": None, "images_per_s": None, "note": ""}
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
        f"# DP-SGD cost: {settings['model']} UNet, B={settings['batch_size']}"
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
    then_settings = {"physical_batch_size": compare.get("settings", {}).get("batch_size"),  # absent: one chunk
                     **compare.get("settings", {})}
    differ += [k for k in ("model", "batch_size", "physical_batch_size", "sample_batch", "repeats", "warmup")
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
    p.add_argument("--model", choices=MODELS, default="dpdm", help="UNet config in conf/model/ (default: dpdm)")
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
            physical_batch_size=args.physical_batch_size,
        )
    except BenchSettingsError as err:
        parser.error(str(err))
    except BenchInterrupted as err:
        print(f"dp-diffusion bench: {err}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
