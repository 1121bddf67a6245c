"""The run's image grids: the grid itself, pixel for pixel, and the titles and row labels around it."""

import numpy as np
import torch
from matplotlib import image

from fastvae.training.figures import image_grid, row_label_pixels, save_image_grid


def test_a_labelled_grid_keeps_every_pixel_of_the_grid_and_labels_the_margins(tmp_path):
    images = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = image_grid(images, 4)  # 3 rows of 8x8 tiles shown at 32x32
    save_image_grid(tmp_path / "plain.png", images, 4)
    save_image_grid(tmp_path / "labelled.png", images, 4, title="a title", row_labels=("data", "model"))
    plain, labelled = image.imread(tmp_path / "plain.png"), image.imread(tmp_path / "labelled.png")
    assert plain.shape[:2] == grid.shape == (3 * 34 + 2, 4 * 34 + 2)
    top = labelled.shape[0] - grid.shape[0]
    left = row_label_pixels(("data", "model"))
    assert labelled.shape[1] == grid.shape[1] + left and top > 0
    # One pixel of the file per pixel of the grid: the plain grid's pixels exactly, which are the grid's values
    # through the grey colour map's 256 levels (floor(256 v) / 255, within a level after rounding).
    np.testing.assert_array_equal(labelled[top:, left:], plain)
    np.testing.assert_allclose(plain[..., 0], np.minimum(np.floor(grid * 256), 255) / 255, atol=1.01 / 255)
    ink = lambda region: (region[..., :3] < 0.5).any(axis=-1)  # noqa: E731
    assert ink(labelled[:top]).any()  # the title
    label_rows = ink(labelled[top:, :left]).any(axis=1)
    for row in range(3):  # a label beside each row of tiles, none beside the borders between them
        assert label_rows[2 + row * 34 : 2 + row * 34 + 32].any()
        assert not label_rows[row * 34 : row * 34 + 2].any()


def test_a_long_title_wraps_onto_more_lines_above_a_narrow_grid(tmp_path):
    images = torch.rand(4, 1, 8, 8)
    save_image_grid(tmp_path / "short.png", images, 2, title="short")
    save_image_grid(tmp_path / "long.png", images, 2, title="a title far too long for a grid two tiles wide " * 2)
    short, long = image.imread(tmp_path / "short.png"), image.imread(tmp_path / "long.png")
    assert short.shape[1] == long.shape[1] and long.shape[0] > short.shape[0] + 14
