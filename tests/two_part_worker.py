"""Run by test_two_part.py: `ToyTwoPart` under 2-process Lightning DDP on CPU (gloo).

Usage: python two_part_worker.py OUT_DIR
Each rank saves the generator's and the critic's parameters before and after 4 steps, and the ledger's
mechanisms, to OUT_DIR/rank{r}.pt.
"""

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from toy_models import ToyTwoPart, toy_dataset  # noqa: E402

from dp_diffusion.privacy import PrivacySpec  # noqa: E402


class SaveParts(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.before = None

    @staticmethod
    def parts(module: ToyTwoPart) -> dict[str, dict[str, torch.Tensor]]:
        return {name: {k: v.detach().clone() for k, v in getattr(module, name).state_dict().items()}
                for name in ("generator", "critic")}

    def on_train_start(self, trainer, module):
        self.before = self.parts(module)

    def on_train_end(self, trainer, module):
        torch.save({"before": self.before, "after": self.parts(module), "world_size": trainer.world_size,
                    "mechanisms": module.ledger.mechanisms}, self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    out = Path(sys.argv[1])
    L.seed_everything(0, verbose=False)
    spec = PrivacySpec(epsilon=1e6, delta=1e-3, accountant="rdp", noise_multiplier=1.0, max_grad_norm=0.5,
                       reproducible=True)
    module = ToyTwoPart(spec, batch_size=8, physical_batch_size=3, steps=4)
    module.attach_private_data(toy_dataset(n=80))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[SaveParts(out)])
    trainer.fit(module)


if __name__ == "__main__":
    main()
