"""fastvae.corruption: parsing --denoise specs, and what each corruption does to images."""

import math

import pytest
import torch

from fastvae.corruption import GaussianCorruption, MaskCorruption, parse_corruption


@pytest.mark.parametrize(
    "spec, kind, level",
    [("gaussian:0.3", GaussianCorruption, 0.3), ("mask:0.5", MaskCorruption, 0.5), ("mask:1e-3", MaskCorruption, 1e-3)],
)
def test_specs_parse_and_print_back(spec, kind, level):
    corruption = parse_corruption(spec)
    assert type(corruption) is kind and corruption.level == level
    assert parse_corruption(str(corruption)).level == level
    assert parse_corruption(None) is None


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("salt:0.1", "KIND one of gaussian, mask"),
        ("gaussian", "positive number"),
        ("gaussian:", "positive number"),
        ("gaussian:0", "positive number"),  # corrupts nothing
        ("gaussian:-0.1", "positive number"),
        ("gaussian:inf", "positive number"),
        ("gaussian:nan", "positive number"),
        ("mask:1", "strictly between 0 and 1"),  # zeroes everything
        ("mask:0", "strictly between 0 and 1"),
        ("mask:half", "strictly between 0 and 1"),
    ],
)
def test_bad_specs_are_value_errors_naming_the_spec(spec, fragment):
    with pytest.raises(ValueError, match="denoise") as error:
        parse_corruption(spec)
    assert fragment in str(error.value)


def test_gaussian_adds_noise_of_its_sigma_and_clips_to_the_unit_range():
    x = torch.full((64, 1, 16, 16), 0.5)
    x[:, :, :4] = 0.0  # clipped at 0 half of the time
    x[:, :, -4:] = 1.0
    noise = GaussianCorruption(0.1).noise(64, (1, 16, 16), generator=torch.Generator().manual_seed(0), device="cpu")
    corrupted = GaussianCorruption(0.1).apply(x, noise)
    assert corrupted.shape == x.shape and x.unique().tolist() == [0.0, 0.5, 1.0]  # the input is untouched
    torch.testing.assert_close(corrupted[:, :, 4:-4], 0.5 + 0.1 * noise[:, :, 4:-4])
    assert corrupted.min() == 0 and corrupted.max() == 1
    assert torch.equal(corrupted[:, :, :4], (0.1 * noise[:, :, :4]).clamp(min=0))
    assert abs(float((corrupted[:, :, 4:-4] - 0.5).std()) - 0.1) < 0.005


def test_mask_zeroes_that_fraction_of_whole_pixels():
    x = torch.rand(32, 3, 20, 20) * 0.9 + 0.1  # no zeros of its own
    corrupted = MaskCorruption(0.3)(x, generator=torch.Generator().manual_seed(1))
    zeroed = corrupted == 0
    assert torch.equal(zeroed.all(1), zeroed.any(1))  # a pixel is zeroed in every channel or none
    assert abs(zeroed[:, 0].float().mean().item() - 0.3) < 0.02
    assert torch.equal(corrupted[~zeroed], x[~zeroed])


def test_a_slice_of_the_global_batchs_noise_is_what_that_rank_applies():
    """The engine's --noise global: the noise of the whole batch, drawn once, sliced per rank."""
    corruption = MaskCorruption(0.5)
    noise = corruption.noise(8, (2, 4, 4), generator=torch.Generator().manual_seed(2), device="cpu")
    assert noise.shape == (8, 1, 4, 4)
    x = torch.rand(8, 2, 4, 4)
    whole = corruption.apply(x, noise)
    assert torch.equal(corruption.apply(x[4:], noise[4:]), whole[4:])
    # Fresh noise per call of the same generator; the same seed repeats it.
    generator = torch.Generator().manual_seed(3)
    first, second = corruption(x, generator=generator), corruption(x, generator=generator)
    assert not torch.equal(first, second)
    assert torch.equal(corruption(x, generator=torch.Generator().manual_seed(3)), first)
    assert math.isclose(corruption.level, 0.5)
