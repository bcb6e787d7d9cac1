"""The `dp-diffusion` command: `train`, `sample`, `evaluate` (each a Hydra main)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from pathlib import Path

import hydra
from omegaconf import DictConfig

# The Hydra config tree lives at the repository root (`conf/`); an absolute path
# makes Hydra read it as files, wherever the command is run from.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

USAGE = """usage: dp-diffusion COMMAND [hydra overrides...]

commands:
  train      train a method on private data (default: DPDM on embedded MNIST at epsilon=10),
             then write the privacy report, samples and results
  sample     draw samples from a checkpoint:  dp-diffusion sample checkpoint=PATH
  evaluate   score samples or a checkpoint against real data:
             dp-diffusion evaluate samples=PATH.npz data=mnist5k   (or checkpoint=PATH.ckpt)
  bench      the cost of privacy: DP step time and memory against the non-private step
             dp-diffusion bench --model dpdm --batch-size 64 --noise-multiplicity 1,4,8,32
  audit      an empirical lower bound on epsilon from canaries, next to the claimed epsilon
             dp-diffusion audit privacy.epsilon=1   (audit.mode=whitebox|blackbox; see conf/audit.yaml)
  report     results files or run dirs -> RESULTS.md, plots against epsilon, sample mosaic, papers' numbers
             dp-diffusion report runs/ --out runs/report   (--wandb: log it to W&B too)

examples:
  dp-diffusion train
  dp-diffusion train privacy.epsilon=1 train.epochs=30
  dp-diffusion train -m privacy.epsilon=1,5,10
  dp-diffusion train experiment=dpdm_mnist_eps10 trainer=gpu
  dp-diffusion train --cfg job        # print the composed config
"""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn mistakes a user can fix into one line on stderr and exit status 2; Ctrl-C into status 130."""
    from dp_diffusion.config import ConfigError
    from dp_diffusion.data.registry import DatasetNotFoundError, UnknownDatasetError
    from dp_diffusion.privacy import PrivacyError

    try:
        yield
    except (ConfigError, DatasetNotFoundError, UnknownDatasetError, PrivacyError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # `train` has already said where its checkpoint is and how to resume
        print("interrupted", file=sys.stderr)
        sys.exit(130)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def train_main(cfg: DictConfig) -> float | None:
    from dp_diffusion.train import run_training

    with user_errors():
        record = run_training(cfg)
    eps = record.get("privacy", {}).get("epsilon")
    return float(eps) if isinstance(eps, (int, float)) else None


@hydra.main(config_path=CONF_DIR, config_name="sample", version_base="1.3")
def sample_main(cfg: DictConfig) -> None:
    from dp_diffusion.sample import run_sampling

    with user_errors():
        run_sampling(cfg)


@hydra.main(config_path=CONF_DIR, config_name="evaluate", version_base="1.3")
def evaluate_main(cfg: DictConfig) -> None:
    from dp_diffusion.evaluate import run_evaluation

    with user_errors():
        run_evaluation(cfg)


@hydra.main(config_path=CONF_DIR, config_name="audit", version_base="1.3")
def audit_main(cfg: DictConfig) -> None:
    from dp_diffusion.audit.run import run_audit

    with user_errors():
        run_audit(cfg)


def report_main() -> None:
    from dp_diffusion.report import main as report

    with user_errors():
        report()


def bench_main() -> None:
    from dp_diffusion.bench import main as bench

    bench()


COMMANDS = {"train": train_main, "sample": sample_main, "evaluate": evaluate_main, "bench": bench_main,
            "audit": audit_main, "report": report_main}


# Lightning's DDP launcher starts ranks > 0 by re-running this process's command line from sys.argv,
# which holds only the Hydra overrides (Hydra must not see the command word): the command travels in
# the environment the launcher copies to its children.
COMMAND_ENV = "DP_DIFFUSION_COMMAND"


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    relaunched = os.environ.get(COMMAND_ENV)
    if relaunched in COMMANDS and "LOCAL_RANK" in os.environ and (not args or args[0] not in COMMANDS):
        args = [relaunched, *args]  # a DDP rank started by Lightning
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    os.environ[COMMAND_ENV] = command
    sys.argv = [sys.argv[0], *rest]
    from dp_diffusion.allocator import keep_freed_memory

    keep_freed_memory()  # before torch allocates anything large; see allocator.py
    COMMANDS[command]()


if __name__ == "__main__":
    main()
