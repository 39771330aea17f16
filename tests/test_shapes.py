"""The shapes testbed's checker (docs/algorithms.md §6c) on images built by hand: each rule's violation is
drawn pixel by pixel here, independently of the generator, and must be named."""

import numpy as np
import pytest
import torch

from uncdiff.data.shapes import RULES, SIZE, check, check_batch, invalid_mask, make_shapes
from uncdiff.io.images import from_uint8

SQUARE = ["XXXX"] * 4
CROSS = ["..X..", "..X..", "XXXXX", "..X..", "..X.."]
TRIANGLE = ["...X...", "..XXX..", ".XXXXX.", "XXXXXXX"]


def draw(*shapes: tuple[list[str], int, int]) -> torch.Tensor:
    """A uint8 image [1, 16, 16] with each (rows of 'X', top, left) drawn in ink."""
    image = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
    for rows, top, left in shapes:
        for r, row in enumerate(rows):
            for c, char in enumerate(row):
                if char == "X":
                    image[0, top + r, left + c] = 255
    return image


def test_every_training_image_is_valid_and_the_set_is_a_function_of_its_seed():
    images, labels = make_shapes(2000, seed=0)
    assert images.dtype == torch.uint8 and images.shape == (2000, 1, SIZE, SIZE)
    assert not invalid_mask(images).any()
    assert not invalid_mask(from_uint8(images)).any()  # the model's range, [-1, 1]
    assert set(labels.tolist()) == set(range(1, 8))  # every non-empty combination of the three kinds
    again, _ = make_shapes(2000, seed=0)
    other, _ = make_shapes(2000, seed=1)
    assert torch.equal(images, again) and not torch.equal(images, other)


def test_hand_drawn_valid_images():
    assert check(draw((SQUARE, 1, 0))).valid
    assert check(draw((SQUARE, 0, 12), (CROSS, 6, 11), (TRIANGLE, 12, 0))).valid
    assert check(draw((TRIANGLE, 11, 9))).valid  # anywhere inside its band, not only the training row


@pytest.mark.parametrize("image, rule", [
    (draw(), "blank"),
    (draw((["XXXX"] * 3, 1, 0)), "malformed"),                          # a 4x3 box
    (draw((["XXXX", "XXXX", "XXX.", "XXXX"], 1, 3)), "malformed"),      # one pixel missing
    (draw((SQUARE, 1, 0), (SQUARE, 1, 3)), "malformed"),                 # two squares overlapping: one blob
    (draw((SQUARE, 1, 0), (CROSS, 5, 2)), "malformed"),                  # touching diagonally: one component
    (draw((SQUARE, 6, 0)), "wrong_region"),                              # a square in the cross's band
    (draw((CROSS, 3, 0)), "wrong_region"),                               # straddling two bands
    (draw((TRIANGLE, 1, 4)), "wrong_region"),
    (draw((SQUARE, 1, 0), (SQUARE, 1, 8)), "duplicate"),
    (draw((CROSS, 6, 0), (CROSS, 6, 8)), "duplicate"),
])
def test_each_rule_is_caught_and_named(image, rule):
    verdict = check(image)
    assert verdict.rule == rule and not verdict.valid
    assert rule in RULES


def test_noise_is_invalid():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(50, 1, SIZE, SIZE, generator=generator).clamp(-1, 1)
    assert invalid_mask(noise).all()
    assert {v.rule for v in check_batch(noise)} <= {"malformed", "blank"}


def test_stable_under_small_pixel_noise():
    """Pixel noise below half the range's distance to the threshold changes no verdict, valid or not."""
    images = from_uint8(make_shapes(200, seed=3)[0])
    broken = from_uint8(torch.stack([draw((SQUARE, 1, 0), (SQUARE, 1, 8)), draw((SQUARE, 6, 0))]))
    generator = torch.Generator().manual_seed(1)
    for batch in (images, broken):
        noisy = (batch + 0.9 * (2 * torch.rand(batch.shape, generator=generator) - 1)).clamp(-1, 1)
        assert [v.rule for v in check_batch(noisy)] == [v.rule for v in check_batch(batch)]


def test_wrong_shapes_of_input_are_refused():
    with pytest.raises(ValueError, match=r"\[1, 16, 16\]"):
        check(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="n must be >= 1"):
        make_shapes(0, seed=0)


def test_uint8_and_float_agree_at_the_threshold():
    image = draw((SQUARE, 1, 0))
    dim = image.clone()
    dim[0, 1, 0] = 127  # below the uint8 middle: the square loses a pixel
    assert check(image).valid and check(dim).rule == "malformed"
    assert check(from_uint8(dim)).rule == "malformed"
    assert np.isclose(float(from_uint8(torch.tensor([127], dtype=torch.uint8))), -1 / 255, atol=1e-6)


class FakeTrainer:
    global_rank, world_size = 0, 1


class FakeModule:
    """Stands in for a DiffusionModule: seed s gives a valid image when s is even, two squares (rule
    `duplicate`) when odd, scored s; guided sampling gives valid images only."""

    device = torch.device("cpu")

    def sample(self, seeds, batch_size, sampler, estimator=None, guidance=None):
        from uncdiff.uncertainty.sampling import SampleResult

        good, bad = draw((SQUARE, 1, 0)), draw((SQUARE, 1, 0), (SQUARE, 1, 8))
        images = from_uint8(torch.stack([good if s % 2 == 0 or guidance is not None else bad for s in seeds]))
        return SampleResult(images=images, scores=torch.tensor(seeds, dtype=torch.float))


def test_invalid_rate_callback_counts_the_checkers_labels():
    from uncdiff.callbacks import InvalidRate
    from uncdiff.uncertainty.spec import EstimatorSpec, GuidanceSpec

    callback = InvalidRate(num_samples=10, seed=0, fraction_dropped=0.5, batch_size=3,
                           guidance=GuidanceSpec(rule="gradient"))
    rates = callback.rates(FakeTrainer(), FakeModule())
    assert rates["unguided"] == 0.5 and rates["unguided_duplicate"] == 0.5 and rates["unguided_malformed"] == 0
    assert rates["filtered"] == pytest.approx(0.4)  # drops the 5 highest scores, seeds 5..9: odd seeds 1 and 3 stay of 0..4
    assert rates["guided"] == 0.0
    with pytest.raises(ValueError, match="estimator.name must be aleatoric or mc_dropout"):
        InvalidRate(estimator=EstimatorSpec(name="none"))
