"""The classifier zoo and the one supervised loop behind the domain backbone and downstream accuracy.

The recorded figures come from the code before the two training loops of ``metrics/`` were
merged (commit 24a8206: ``backbones._train_domain_cnn`` and ``downstream.train_and_select``), on
one CPU thread; the merged code reproduces them bit for bit, so the domain backbone's cache
version stays.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from dp_diffusion.data import build_datamodule
from dp_diffusion.metrics.backbones import DOMAIN_BACKBONE_VERSION, DomainBackboneConfig, build_domain_backbone
from dp_diffusion.metrics.backbones import extract_features
from dp_diffusion.metrics.classifiers import CNN, MLP, ConvNet, DomainCNN, accuracy, fit_classifier
from dp_diffusion.metrics.downstream import downstream_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist_tenth():
    """Slices of mnist5k (sorted by class) with every class: 400 train images (every 10th), 400
    validation images (the 5th of each ten), 250 test images (every 4th), and every 5th test image
    (200) for the feature checksums."""
    dm = build_datamodule("mnist5k")
    dm.setup()
    (x, y), (test_x, test_y) = dm.train_tensors(), dm.test_tensors()
    return {"train": (x[::10], y[::10]), "val": (x[5::10], y[5::10]), "test": (test_x[::4], test_y[::4]),
            "probe": test_x[::5]}


# (accuracy, best_epoch, val_curve) per classifier, recorded from the code before the merge.
DIGITS_5_EPOCHS = {
    "logreg": (0.2, 5, [0.05555555555555555, 0.08333333333333333, 0.13194444444444445, 0.1597222222222222,
                        0.20833333333333334]),
    "mlp": (0.6816901408450704, 5, [0.18055555555555555, 0.2916666666666667, 0.4375, 0.5555555555555556,
                                    0.6388888888888888]),
    "cnn": (0.43380281690140843, 5, [0.1527777777777778, 0.11805555555555555, 0.16666666666666666,
                                     0.3402777777777778, 0.4652777777777778]),
}
MNIST_CNN_2_EPOCHS = {"cnn": (0.172, 2, [0.15, 0.2])}
MNIST_SEPARATE_VAL = {"logreg": (0.244, 2, [0.1725, 0.2175]), "mlp": (0.264, 2, [0.2275, 0.29])}
# lr 0.05: the MLP's best validation epoch is the 2nd of 6, so selection restores earlier weights.
MNIST_SELECT_LR_005 = {"mlp": (0.18, 2, [0.15, 0.175, 0.15, 0.1, 0.1, 0.125]),
                       "logreg": (0.62, 6, [0.2, 0.475, 0.475, 0.575, 0.55, 0.65])}


def _assert_recorded(results: dict, recorded: dict) -> None:
    assert set(results) == set(recorded)
    for name, (acc, best_epoch, curve) in recorded.items():
        assert (results[name]["accuracy"], results[name]["best_epoch"], results[name]["val_curve"]) == (
            acc, best_epoch, curve), name


def test_downstream_accuracy_is_unchanged_on_the_8x8_digits():
    dm = build_datamodule("digits")
    dm.setup()
    results = downstream_accuracy(*dm.train_tensors(), *dm.test_tensors(), epochs=5, seed=0, disable_progress=True)
    _assert_recorded(results, DIGITS_5_EPOCHS)
    assert {r["num_train"] for r in results.values()} == {1298} and {r["num_test"] for r in results.values()} == {355}


def test_downstream_accuracy_is_unchanged_on_mnist(mnist_tenth):
    data = (*mnist_tenth["train"], *mnist_tenth["test"])
    _assert_recorded(
        downstream_accuracy(*data, classifiers=("cnn",), epochs=2, seed=1, disable_progress=True),
        MNIST_CNN_2_EPOCHS,
    )
    val_x, val_y = mnist_tenth["val"]
    separate = downstream_accuracy(*data, classifiers=("logreg", "mlp"), epochs=2, seed=2, val_images=val_x,
                                   val_labels=val_y, disable_progress=True)
    _assert_recorded(separate, MNIST_SEPARATE_VAL)
    assert separate["mlp"]["num_val"] == 400
    _assert_recorded(
        downstream_accuracy(*data, classifiers=("mlp", "logreg"), epochs=6, lr=0.05, seed=4, disable_progress=True),
        MNIST_SELECT_LR_005,
    )


def test_domain_backbone_weights_and_features_are_unchanged(mnist_tenth, tmp_path):
    backbone = build_domain_backbone("tiny", *mnist_tenth["train"], config=DomainBackboneConfig(epochs=2, seed=3),
                                     cache_dir=tmp_path)
    assert DOMAIN_BACKBONE_VERSION == "1"  # same weights: caches written before the merge stay valid
    assert backbone.info["train_accuracy"] == 0.4225
    features = extract_features(backbone, mnist_tenth["probe"])
    assert features["features"].sum().item() == pytest.approx(2112.547332816175, rel=1e-6)
    assert features["features"].square().sum().item() == pytest.approx(615.8760900305488, rel=1e-6)
    assert features["logits"].sum().item() == pytest.approx(-100.8348533990793, rel=1e-6)


# --- the zoo and the loop -----------------------------------------------------------------


def test_one_conv_net_family_serves_both_uses():
    domain = DomainCNN(1, 10, (28, 28))
    # The state-dict layout of cache version 1, so backbones cached before the merge still load.
    assert list(domain.state_dict()) == [f"body.{i}.{p}" for i in (0, 3, 6, 10) for p in ("weight", "bias")] + [
        "head.weight", "head.bias"]
    assert not any(isinstance(m, torch.nn.Dropout) for m in domain.modules())
    assert domain.features(torch.zeros(2, 1, 28, 28)).shape == (2, 128)
    assert DomainCNN(1, 10, (8, 8))(torch.zeros(2, 1, 8, 8)).shape == (2, 10)  # 8 -> 4 -> 2 -> 1
    with pytest.raises(ValueError, match="at least 8x8, got 7x7"):
        DomainCNN(1, 10, (7, 7))
    downstream = CNN((1, 28, 28), 10)
    assert isinstance(downstream, ConvNet) and isinstance(domain, ConvNet)
    assert {m.padding for m in downstream.modules() if isinstance(m, torch.nn.Conv2d)} == {(0, 0)}
    fc = next(m for m in downstream.body if isinstance(m, torch.nn.Linear))
    assert fc.in_features == downstream.flat_features == 1152  # DPDM
    assert sum(isinstance(m, torch.nn.Dropout) for m in downstream.modules()) == 3
    assert ConvNet.min_size(3, padding=0, pool_last=False) == 18 and ConvNet.min_size(3, 1, True) == 8


def _noise_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_fit_classifier_is_seeded_and_leaves_the_callers_rng_alone():
    train = _noise_task(96, 0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, history = fit_classifier(lambda: MLP((1, 8, 8), 3), train, epochs=3, batch_size=32, seed=5,
                                    disable_progress=True)
    assert torch.equal(torch.get_rng_state(), before)
    second, _ = fit_classifier(lambda: MLP((1, 8, 8), 3), train, epochs=3, batch_size=32, seed=5,
                               disable_progress=True)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key])
    other, _ = fit_classifier(lambda: MLP((1, 8, 8), 3), train, epochs=3, batch_size=32, seed=6,
                              disable_progress=True)
    assert not torch.equal(first.net[1].weight, other.net[1].weight)
    # Without a validation set the last epoch's weights are kept.
    assert history == {"best_epoch": 3, "val_accuracy": None, "val_curve": [], "epochs": 3, "num_train": 96,
                       "num_val": 0}
    assert not first.training
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        fit_classifier(lambda: MLP((1, 8, 8), 3), train, epochs=0)


def test_fit_classifier_restores_the_best_validation_epoch():
    train, val = _noise_task(96, 0), _noise_task(60, 1)  # noise: the validation accuracy wanders
    model, history = fit_classifier(lambda: MLP((1, 8, 8), 3), train, val=val, epochs=8, batch_size=16, lr=0.05,
                                    seed=0, disable_progress=True)
    curve = history["val_curve"]
    assert len(curve) == 8 and history["best_epoch"] < 8  # the precondition of this test
    assert history["val_accuracy"] == max(curve) == curve[history["best_epoch"] - 1]
    assert curve.index(max(curve)) == history["best_epoch"] - 1  # the first best epoch, on ties
    assert accuracy(model, *val) == history["val_accuracy"]  # the weights are those of that epoch


def test_metrics_modules_import_alone():
    """Each module of dp_diffusion.metrics imports first, in a fresh interpreter (no import cycles)."""
    script = textwrap.dedent("""
        import importlib, sys
        import torch  # shared by all; the cycle check is about dp_diffusion's own modules
        for name in ("classifiers", "backbones", "downstream", "fidelity", "__init__"):
            for loaded in [m for m in sys.modules if m.startswith("dp_diffusion")]:
                del sys.modules[loaded]
            importlib.import_module("dp_diffusion.metrics" + ("" if name == "__init__" else "." + name))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
