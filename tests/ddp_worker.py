"""Run by test_ddp.py: 2-process Lightning DDP on CPU (gloo) with the privacy core.

Usage: python ddp_worker.py OUT_DIR {weights,noise,poisson} [GRAD_MODE]
Each rank saves its parameters before and after training, and the examples of
each round with its epoch, to OUT_DIR/rank{r}.pt.
"""

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from toy_models import ToyRegression, toy_dataset  # noqa: E402

from dp_diffusion.privacy import PrivacySpec  # noqa: E402


class SaveWeights(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.before = None
        self.rounds: list[tuple[int, list[int]]] = []

    def on_train_start(self, trainer, module):
        self.before = {k: v.detach().clone() for k, v in module.net.state_dict().items()}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.rounds.append((trainer.current_epoch, batch[1].long().tolist()))  # poisson: targets are indices

    def on_train_end(self, trainer, module):
        after = {k: v.detach().clone() for k, v in module.net.state_dict().items()}
        torch.save({"before": self.before, "after": after, "steps": module.ledger.steps,
                    "world_size": trainer.world_size, "rounds": self.rounds},
                   self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    out, kind = Path(sys.argv[1]), sys.argv[2]
    grad_mode = sys.argv[3] if len(sys.argv) > 3 else "auto"
    L.seed_everything(0, verbose=False)
    if kind == "poisson":
        # Two expected examples per rank (global B = 4 of N = 80, q = 0.05): many empty local batches.
        spec = PrivacySpec(epsilon=1e6, delta=1e-3, accountant="rdp", noise_multiplier=1.0, reproducible=True,
                           grad_mode=grad_mode)
        module = ToyRegression(spec, batch_size=4, physical_batch_size=5, steps=200, lr=0.01)
        x = toy_dataset(n=80).tensors[0]
        module.attach_private_data(torch.utils.data.TensorDataset(x, torch.arange(80.0)))
        max_steps = 200
    else:
        # A huge epsilon target with a given sigma: the test is about noise, not budget. Reproducible,
        # so that runs in two grad modes draw the same masks and noise.
        spec = PrivacySpec(epsilon=1e6, delta=1e-3, accountant="rdp", noise_multiplier=2.0, max_grad_norm=0.5,
                           noise_multiplicity=2, grad_mode=grad_mode, reproducible=kind == "weights")
        dim = 400 if kind == "noise" else 6
        module = ToyRegression(spec, dim=dim, batch_size=16, physical_batch_size=5, steps=4,
                               lr=1.0 if kind == "noise" else 0.1, zero_grad_model=kind == "noise")
        module.attach_private_data(toy_dataset(n=160, dim=dim))
        max_steps = 4
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=max_steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[SaveWeights(out)])
    trainer.fit(module)


if __name__ == "__main__":
    main()
