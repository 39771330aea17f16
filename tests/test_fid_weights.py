"""The digits FID classifier's shipped weights: the files are the ones whose sha256 this test writes
down (standing in for a second machine, which must load the same bytes), the extractor is named by
that digest, loading is bit-reproducible, and no other file passes under a shipped name.

Truths used: sha256 of the files' bytes (hashlib, not the code's own digest); the digits' labels for
the classifier's accuracy; a changed byte changes the digest.
"""

import hashlib
import shutil

import pytest
import torch

import uncdiff.evaluation.fid as fid
from uncdiff.evaluation.fid import ClassifierFeatures, make_extractor

# Written here by hand, not read from the code: a new weights file needs both changed on purpose.
SHIPPED = {
    8: "486218ac370a4218ef49c1703e04823863833221d409b8aa53cf273175cd26f1",
    16: "9a9136327f8cebeb2590f3a7a50ea54072a2f740955b9fc8c7c0c614344dcbe6",
}


@pytest.mark.parametrize("size", sorted(SHIPPED))
def test_shipped_weights_have_the_written_digest_and_name(size):
    path = fid.shipped_weights("digits", size)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHIPPED[size]
    assert fid.SHIPPED_WEIGHTS["digits", size] == SHIPPED[size]
    extractor = make_extractor("digits-classifier", image_size=size)
    assert extractor.path == path and extractor.sha256 == SHIPPED[size]
    assert extractor.name == f"digits-classifier-{SHIPPED[size][:12]}"


@pytest.mark.parametrize("size", sorted(SHIPPED))
def test_two_loads_give_bit_identical_features_and_classify_held_out_digits(size):
    _, _, val_x, val_y = fid.LABELLED_DATASETS["digits"](size)
    noise = torch.rand(8, 1, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    first, second = ClassifierFeatures(image_size=size), ClassifierFeatures(image_size=size)
    for images in (val_x, noise):
        torch.testing.assert_close(first(images), second(images), rtol=0, atol=0)
    assert first(val_x).shape == (len(val_x), first.num_features)
    accuracy = (first.head(first(val_x)).argmax(1) == val_y).float().mean().item()
    assert accuracy > 0.95


def test_a_changed_shipped_file_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / fid.shipped_weights("digits", 16).name
    shutil.copyfile(fid.shipped_weights("digits", 16), copy)
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    copy.write_bytes(bytes(data))
    monkeypatch.setattr(fid, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ValueError, match=f"sha256 {hashlib.sha256(data).hexdigest()}.*{SHIPPED[16]}.*reinstall"):
        ClassifierFeatures()
    # the same file given on purpose loads under its own name
    assert ClassifierFeatures(weights_path=str(copy)).name == f"digits-classifier-{hashlib.sha256(data).hexdigest()[:12]}"


@pytest.mark.parametrize("options, message", [
    ({"epochs": 3}, r"epochs: training settings, used only with retrain: true"),
    ({"image_size": 12}, r"no digits classifier ships for 12x12 images \(shipped: \[8, 16\]\); set retrain: true"),
    ({"retrain": True, "weights_path": "w.safetensors"}, r"give one of them"),
    ({"image_size": 8, "weights_path": str(fid.shipped_weights("digits", 16))}, r"16x16 digits images, not 8x8"),
])
def test_bad_options_are_refused_before_any_training(options, message, monkeypatch):
    monkeypatch.setattr(fid, "train_classifier", lambda settings: pytest.fail("trained"))
    with pytest.raises(ValueError, match=message):
        make_extractor("digits-classifier", **options)


def test_a_file_that_is_not_a_classifier_is_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a classifier file written by uncdiff"):
        make_extractor("digits-classifier", weights_path=str(path))
