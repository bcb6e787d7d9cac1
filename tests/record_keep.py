"""Record the figures that tests/test_keep.py pins: DPDM and DP-SynGen trained exactly as at commit fd81818.

The figures in tests/keep_fd81818.json come from commit fd81818 (the commit before issue 13 reshaped the
privacy core, build.py and the methods). To record them again from that commit:

    git worktree add /tmp/keep_fd81818 fd81818
    PYTHONPATH=/tmp/keep_fd81818 .venv/bin/python tests/record_keep.py --out tests/keep_fd81818.json

(run from the repository root; PYTHONPATH makes `dp_diffusion` that commit's package, and the script checks
that it is). Each run trains through `run_training`, the path `dp-diffusion train` takes, on the embedded
8x8 digits with model=tiny, privacy.reproducible=true, seed 0, one CPU thread and a few steps, then reads
the calibrated sigma, the privacy ledger and the weights from final.ckpt and the headline epsilon from
privacy.json. The script trains each setting twice and records whether the two runs' weights are
bit-identical (they must be for the test's exact comparison to mean anything).

OS entropy: at fd81818 DP-SynGen's synthetic stages are trained by a non-private module whose Poisson masks
come from a secret drawn from OS entropy (`secrets.token_bytes`) even under privacy.reproducible=true, so two
DP-SynGen runs with the same seed differ (the stage models, and through the global generator's draws the
context model too). `counted_entropy()` replaces `secrets.token_bytes` with a counter-based stream for the
recording and for the test, which makes both methods bit-identical across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from hydra import compose, initialize_config_dir

# One setting per method: small enough that both train in a few seconds on one thread.
COMMON = [
    "data=digits", "model=tiny", "seed=0", "trainer=cpu", "logger=csv", "eval=none", "sample.num_samples=0",
    "train.steps=3", "train.batch_size=64", "train.physical_batch_size=32", "train.checkpoint_every_n_steps=50",
    "privacy.epsilon=5", "privacy.noise_multiplicity=2", "privacy.reproducible=true",
]
SETTINGS: dict[str, list[str]] = {
    "dpdm": ["method=dpdm"],
    "dp_syngen": [
        "method=dp_syngen", "method.module.variant=switching", "method.module.synthetic.steps=2",
        "method.module.synthetic.batch_size=16", "method.module.synthetic.size=64",
        "method.module.synthetic.noise_multiplicity=2",
    ],
}


@contextlib.contextmanager
def counted_entropy() -> Iterator[None]:
    """`secrets.token_bytes(n)` returns SHA-256 of a call counter (truncated or repeated to n bytes)."""
    calls = iter(range(1 << 62))

    def token_bytes(n: int | None = None) -> bytes:
        block = hashlib.sha256(f"keep-entropy-{next(calls)}".encode()).digest()
        return (block * (1 + (n or 32) // len(block)))[: n or 32]

    with mock.patch.object(secrets, "token_bytes", token_bytes):
        yield


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per-tensor float64 sums (repr, so every digit survives JSON) and one sha256 of the float32 bytes of all
    floating-point tensors in key order (integer buffers such as step counters hash as their own bytes)."""
    digest = hashlib.sha256()
    sums: dict[str, float] = {}
    for key in state_dict:
        tensor = state_dict[key].detach().cpu().contiguous()
        if tensor.is_floating_point():
            sums[key] = float(tensor.to(torch.float64).sum())
            tensor = tensor.to(torch.float32)
        digest.update(key.encode())
        digest.update(tensor.numpy().tobytes())
    return {"sha256": digest.hexdigest(), "sums": sums}


def train_once(overrides: list[str], out: Path) -> dict[str, Any]:
    """Train one run into `out` through `run_training`; the figures the Keep test compares."""
    from dp_diffusion.cli import CONF_DIR
    from dp_diffusion.train import run_training

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*COMMON, *overrides, f"output_dir={out}",
                                           f"results_file={out / 'all.jsonl'}"])
    with counted_entropy():
        record = run_training(cfg)
    report = json.loads((out / "privacy.json").read_text())
    checkpoint = torch.load(out / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=False)
    ledger = find_ledger(checkpoint)
    return {
        "noise_multiplier": report["noise_multiplier"],
        "sample_rate": report["sample_rate"],
        "steps": report["steps"],
        "epsilon": report["epsilon"],
        "epsilon_prv": report["epsilon_prv"],
        "epsilon_rdp": report["epsilon_rdp"],
        "record_epsilon": record["epsilon"],
        # the ledger as the report states it and as the checkpoint stores it
        "report_mechanisms": {name: {"steps": share["steps"], "history": [list(e) for e in share["history"]]}
                              for name, share in report["mechanisms"].items()},
        "ledger": {
            "delta": ledger["delta"],
            "accountant": ledger["accountant"],
            "mechanisms": {name: [list(e) for e in history] for name, history in ledger["mechanisms"].items()},
        },
        "weights": weights_fingerprint(checkpoint["state_dict"]),
    }


def find_ledger(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The privacy ledger's state in a checkpoint, wherever the privacy core keeps it (a dict under a
    "ledger" key that has "mechanisms")."""
    stack: list[Any] = [checkpoint]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ledger = node.get("ledger")
            if isinstance(ledger, dict) and "mechanisms" in ledger:
                return ledger
            stack.extend(v for k, v in node.items() if k != "state_dict")
    raise KeyError("no privacy ledger in the checkpoint")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting (bit-identity check)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the test runs on one thread too: summation order is part of the weights

    import dp_diffusion

    source = Path(dp_diffusion.__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(source), "status", "--porcelain", "dp_diffusion"],
                                capture_output=True, text=True, check=True).stdout.strip())
    results: dict[str, Any] = {
        "commit": commit + ("-dirty" if dirty else ""),
        "torch": torch.__version__,
        "threads": 1,
        "common_overrides": COMMON,
        "settings": {},
    }
    for name, overrides in SETTINGS.items():
        runs = []
        for repeat in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(train_once(overrides, Path(tmp) / "run"))
            print(f"{name} run {repeat}: sigma={runs[-1]['noise_multiplier']!r} epsilon={runs[-1]['epsilon']!r} "
                  f"sha256={runs[-1]['weights']['sha256']}", file=sys.stderr)
        first = runs[0]
        results["settings"][name] = {
            "overrides": overrides,
            **first,
            "bit_identical_across_runs": all(run == first for run in runs[1:]),
        }
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out} from {results['commit']}", file=sys.stderr)


if __name__ == "__main__":
    main()
