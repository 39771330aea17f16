"""FID: the distance against closed forms and properties, the caches, the extractors' errors.

Truths used: the Fréchet distance between N(0, I_d) and N(m, s^2 I_d) is |m|^2 + d (1 - s)^2; a set
is at distance 0 from itself; adding more noise to one side moves it further away; a cache hit
does not touch the data again; two ranks see the FID one process sees.
"""

import hashlib
import urllib.error

import pytest
import torch
from torch import nn

import uncdiff.evaluation.fid as fid
from uncdiff.evaluation.fid import (ClassifierFeatures, FIDEvaluator, InceptionFeatures, fid_between, make_extractor,
                         real_feature_stats, stats_path)


class Flatten(nn.Module):
    """Pixels as features: makes the FID a distance between pixel distributions (closed forms)."""

    def __init__(self, name="flatten", dim=8):
        super().__init__()
        self.name, self.num_features = name, dim

    def forward(self, images):
        return images.flatten(1)


def gaussian_images(n, mean=0.0, std=1.0, seed=0):
    """`[n, 1, 2, 4]` "images" whose 8 pixels are i.i.d. N(mean, std^2)."""
    return mean + std * torch.randn(n, 1, 2, 4, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def digits():
    """The digits' (train, held-out) images, float [-1, 1], 16x16."""
    train_x, _, val_x, _ = fid.LABELLED_DATASETS["digits"](16)
    return train_x, val_x


@pytest.fixture(scope="module")
def classifier():
    """The digits classifier shipped for 16x16 images."""
    return ClassifierFeatures()


def test_fid_matches_gaussian_closed_form():
    d, s, m = 8, 2.0, 0.5
    x, y = gaussian_images(20_000, seed=1), gaussian_images(20_000, mean=m, std=s, seed=2)
    expected = d * m**2 + d * (1 - s) ** 2  # |m|^2 + tr(I + s^2 I - 2 s I)
    assert fid_between(x, y, Flatten()) == pytest.approx(expected, rel=0.03)


@pytest.mark.slow
def test_fid_of_a_set_with_itself_is_zero(classifier, digits):
    train_x, val_x = digits
    a = train_x[:400]
    scale = fid_between(a, val_x, classifier)  # two different samples of the same digits
    assert scale > 1.0
    assert abs(fid_between(a, a, classifier)) < 1e-4 * scale


@pytest.mark.slow
def test_fid_grows_with_added_noise(classifier, digits):
    a = digits[0][:400]
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(0))
    values = [fid_between(a, a + sigma * noise, classifier) for sigma in (0.05, 0.1, 0.2, 0.4, 0.8)]
    assert values[0] > 0
    assert all(lo < hi for lo, hi in zip(values, values[1:])), values


def test_retrained_classifier_is_cached_per_settings_and_named_by_its_weights(tmp_path, classifier, digits,
                                                                               monkeypatch):
    first = ClassifierFeatures(cache_dir=str(tmp_path), retrain=True, epochs=1)
    assert first.trained_now and first.path.parent == tmp_path / "fid_classifiers" and first.path.is_file()
    assert first.name == f"digits-classifier-{hashlib.sha256(first.path.read_bytes()).hexdigest()[:12]}"
    assert first.name != classifier.name  # other weights, another name: no cache keyed by it is shared

    with monkeypatch.context() as patch:
        patch.setattr(fid, "train_classifier", lambda settings: pytest.fail("trained again"))
        second = make_extractor("digits-classifier", cache_dir=str(tmp_path), retrain=True, epochs=1)
        from_file = make_extractor("digits-classifier", weights_path=str(first.path))
    x = digits[1][:16]
    for again in (second, from_file):
        assert not again.trained_now and again.name == first.name
        torch.testing.assert_close(again(x), first(x), rtol=0, atol=0)

    other = ClassifierFeatures(cache_dir=str(tmp_path), retrain=True, epochs=1, seed=1)  # own file, own name
    assert other.trained_now and other.name != first.name and other.path != first.path


def test_classifier_training_is_deterministic(tmp_path):
    a = ClassifierFeatures(cache_dir=str(tmp_path / "a"), image_size=8, retrain=True, epochs=1)
    b = ClassifierFeatures(cache_dir=str(tmp_path / "b"), image_size=8, retrain=True, epochs=1)
    assert a.trained_now and b.trained_now
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    assert a.path.read_bytes() == b.path.read_bytes() and a.name == b.name  # same weights, same file, same name


def test_real_stats_are_cached_per_dataset_and_extractor(tmp_path):
    images = gaussian_images(300)
    calls = []

    def real_images():
        calls.append(1)
        return images.split(128)

    extractor = Flatten()
    stats, computed = real_feature_stats(extractor, "toy", real_images, str(tmp_path))
    assert computed and len(calls) == 1
    assert stats_path(str(tmp_path), "toy", "flatten") == tmp_path / "fid_stats" / "toy-flatten.pt"
    assert (tmp_path / "fid_stats" / "toy-flatten.pt").is_file()
    # torchmetrics' states, checked against the images directly
    assert stats["real_features_num_samples"] == 300
    torch.testing.assert_close(stats["real_features_sum"], images.flatten(1).double().sum(0))

    again, computed = real_feature_stats(extractor, "toy", real_images, str(tmp_path))
    assert not computed and len(calls) == 1
    for key in stats:
        torch.testing.assert_close(again[key], stats[key], rtol=0, atol=0)

    _, computed = real_feature_stats(Flatten(name="other"), "toy", real_images, str(tmp_path))
    assert computed and len(calls) == 2
    _, computed = real_feature_stats(extractor, "toy2", real_images, str(tmp_path))
    assert computed and len(calls) == 3
    assert sorted(p.name for p in (tmp_path / "fid_stats").iterdir()) == [
        "toy-flatten.pt", "toy-other.pt", "toy2-flatten.pt"]


def test_evaluator_uses_cached_real_stats_and_reset_keeps_them(tmp_path):
    real, fake1, fake2 = gaussian_images(400, seed=0), gaussian_images(300, 0.3, 1.5, seed=1), \
        gaussian_images(300, -0.2, 0.7, seed=2)
    evaluator = FIDEvaluator(Flatten(), "toy", lambda: real.split(100), cache_dir=str(tmp_path))
    assert evaluator.name == "flatten"
    for batch in fake1.split(64):
        evaluator.update(batch)
    assert evaluator.compute() == pytest.approx(fid_between(real, fake1, Flatten()), rel=1e-5)

    evaluator.reset()
    evaluator.update(fake2)
    assert evaluator.compute() == pytest.approx(fid_between(real, fake2, Flatten()), rel=1e-5)

    fresh = FIDEvaluator(Flatten(), "toy", lambda: pytest.fail("recomputed"), cache_dir=str(tmp_path))
    assert fresh.prepare() is False
    fresh.update(fake1)
    assert fresh.compute() == pytest.approx(fid_between(real, fake1, Flatten()), rel=1e-5)


def _ddp_worker(rank, world, init_file, cache_dir, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        real, fake = gaussian_images(400, seed=0), gaussian_images(300, 0.3, 1.5, seed=1)
        evaluator = FIDEvaluator(Flatten(), "toy", lambda: real.split(100), cache_dir=cache_dir)
        computed = evaluator.prepare()
        evaluator.update(fake[rank::world])  # each rank sees its shard of the generated images
        torch.save({"fid": evaluator.compute(), "computed": computed}, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_evaluator_under_ddp_counts_real_stats_once(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, tmp_path / "init", str(tmp_path / "cache"), str(tmp_path)),
                                nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    real, fake = gaussian_images(400, seed=0), gaussian_images(300, 0.3, 1.5, seed=1)
    assert r0["computed"] and not r1["computed"]  # rank 0 computed, rank 1 read its file
    assert r0["fid"] == pytest.approx(fid_between(real, fake, Flatten()), rel=1e-5)
    assert r1["fid"] == r0["fid"]


def test_unknown_extractor_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown FID feature extractor 'vgg'.*digits-classifier.*inception"):
        make_extractor("vgg")


def test_missing_local_inception_weights_say_where_to_get_them(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError) as error:
        make_extractor("inception", weights_path=str(missing))
    message = str(error.value)
    assert str(missing) in message and fid.INCEPTION_URL in message and "weights_path" in message


def test_failed_inception_download_says_where_to_get_them(monkeypatch, tmp_path):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as error:
        InceptionFeatures()
    message = str(error.value)
    assert fid.INCEPTION_URL in message and "weights_path" in message
    assert str(tmp_path / "hub" / "checkpoints" / fid.INCEPTION_FILE) in message


@pytest.mark.slow
def test_inception_loads_a_local_weights_file(monkeypatch, tmp_path):
    """A randomly initialised network saved in the format of the real file (its state dict) goes
    through the same `weights_path` code path a user's download does."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    with monkeypatch.context() as patch:  # build the bare network without any weights to load
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: None)
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        random_net = tf_inception.FeatureExtractorInceptionV3("random", ["2048"])
    weights = tmp_path / fid.INCEPTION_FILE
    torch.save(random_net.state_dict(), weights)

    extractor = make_extractor("inception", weights_path=str(weights))
    assert extractor.name == "inception-v3-pool3" and extractor.num_features == 2048
    extractor.train()
    assert not extractor.training  # a fixed feature extractor stays in eval mode
    pixels = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    features = extractor(pixels.float() / 127.5 - 1)  # grey images are repeated to RGB
    assert features.shape == (2, 2048)
    # the same features as torch-fidelity's own extractor (TF1-style resize) on the uint8 images
    (reference,) = random_net(pixels.expand(-1, 3, -1, -1))
    torch.testing.assert_close(features, reference, rtol=1e-4, atol=1e-5)
