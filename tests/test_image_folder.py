"""Folders of image files as datasets (fastvae.image_folder): order, modes, sizes, bad files, fingerprints, the CLI."""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, features

from fastvae import data as data_module
from fastvae import image_folder
from fastvae.data import fingerprint, load_images
from fastvae.errors import ConfigError
from fastvae.training.rundir import FILES
from tests.test_cli import assert_one_line_error, run, snapshot


def save(path, pixels, mode=None, **options):
    """Write ``pixels`` (an array, or an Image) to ``path`` in the format its suffix names, making its folder."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(np.asarray(pixels), mode=mode)
    image.save(path, **options)


def constant(value, size=(6, 5), channels=None):
    """A ``(H, W)`` (or ``(H, W, channels)``) uint8 image of one value."""
    return np.full(size + ((channels,) if channels else ()), value, dtype=np.uint8)


def all_images(data) -> torch.Tensor:
    """The images of ``data`` in the folder's order (training and held-out ones put back in place)."""
    return data.subset("all").images


def test_every_image_file_under_the_folder_is_read_in_the_order_of_its_path(tmp_path):
    # Each image is filled with its own value, so the order can be read back from the pixels.
    named = {"b.png": 2, "a.png": 1, "sub/c.PNG": 3, "sub/deeper/d.png": 4, "e.bmp": 5, "z.gif": 6}
    for name, value in named.items():
        save(tmp_path / name, constant(value * 10))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub" / "labels.csv").write_text("1,2")
    save(tmp_path / ".hidden.png", constant(99))  # hidden files and folders are left out
    save(tmp_path / ".cache" / "f.png", constant(99))
    data = load_images(str(tmp_path))
    assert data.files.names == ("a.png", "b.png", "e.bmp", "sub/c.PNG", "sub/deeper/d.png", "z.gif")
    assert data.image_shape == (1, 6, 5) and data.train.dtype == torch.uint8
    assert all_images(data)[:, 0, 0, 0].tolist() == [10, 20, 50, 30, 40, 60]
    assert (len(data.train), len(data.test)) == (5, 1)
    assert data.files.summary == "greyscale 6x5 from 6 files; 3 other files skipped"
    assert data.name == tmp_path.name


def test_greyscale_only_when_every_image_is_grey_and_alpha_is_dropped(tmp_path):
    grey_palette = Image.new("P", (5, 6))
    grey_palette.putpalette([v for i in range(256) for v in (i, i, i)])
    grey_palette.putdata([70] * 30)
    save(tmp_path / "grey" / "l.png", constant(10))
    save(tmp_path / "grey" / "la.png", np.dstack([constant(20), constant(0)]), mode="LA")  # transparent: alpha dropped
    save(tmp_path / "grey" / "p.png", grey_palette)
    save(tmp_path / "grey" / "sixteen.png", np.full((6, 5), 257 * 40 + 100, dtype=np.uint16))  # scaled, not clipped
    grey = load_images(str(tmp_path / "grey"))
    assert grey.image_shape == (1, 6, 5)
    assert all_images(grey)[:, 0, 0, 0].tolist() == [10, 20, 70, 40]

    colour = Image.new("P", (5, 6))
    colour.putpalette([255, 0, 0] * 256)
    save(tmp_path / "mixed" / "a_grey.png", constant(10))
    save(tmp_path / "mixed" / "b_rgba.png", np.dstack([constant(1), constant(2), constant(3), constant(0)]), "RGBA")
    save(tmp_path / "mixed" / "c_palette.png", colour)
    mixed = load_images(str(tmp_path / "mixed"))
    assert mixed.image_shape == (3, 6, 5)
    assert all_images(mixed)[:, :, 0, 0].tolist() == [[10, 10, 10], [1, 2, 3], [255, 0, 0]]
    assert mixed.files.summary.startswith("RGB 6x5")


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"])
def test_each_format_is_read(tmp_path, suffix):
    if suffix == ".webp" and not features.check("webp"):
        pytest.skip("this Pillow was built without WebP")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 12, 10, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        # A lossless file must round-trip exactly; JPEG (and GIF's palette of 256 colours) come close.
        save(tmp_path / f"{i}{suffix}", image, **({"lossless": True} if suffix == ".webp" else {}))
    images = all_images(load_images(str(tmp_path))).permute(0, 2, 3, 1).numpy()
    assert images.shape == pixels.shape
    if suffix in (".png", ".bmp", ".webp"):
        np.testing.assert_array_equal(images, pixels)


def test_images_of_different_sizes_need_image_size(tmp_path):
    save(tmp_path / "a.png", constant(0, (6, 5)))
    save(tmp_path / "b.png", constant(0, (6, 5)))
    save(tmp_path / "c.png", constant(0, (8, 8)))
    with pytest.raises(ConfigError, match=r"holds images of 2 sizes \(width x height: 5x6: 2 images, such as a.png; "
                       r"8x8: 1 image, such as c.png\); pass --image-size S"):
        load_images(str(tmp_path))
    assert load_images(str(tmp_path), image_size=4).image_shape == (1, 4, 4)


def test_image_size_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    columns = np.tile(np.arange(40, dtype=np.uint8) * 6, (20, 1))  # 20 high, 40 wide, each column its own value
    save(tmp_path / "wide.png", columns)
    save(tmp_path / "tall.png", np.ascontiguousarray(columns.T))  # 40 high, 20 wide
    save(tmp_path / "big.png", constant(200, (60, 90)))
    images = all_images(load_images(str(tmp_path), image_size=20))
    big, tall, wide = images[:, 0].numpy().astype(int)  # sorted: big, tall, wide
    np.testing.assert_allclose(wide, columns[:, 10:30], atol=1)  # already 20 high: the centre 20 columns
    np.testing.assert_allclose(tall, columns.T[10:30], atol=1)
    np.testing.assert_array_equal(big, 200)  # 60x90 -> 20x30 -> the centre 20x20 of a constant image
    summary = load_images(str(tmp_path), image_size=20).files.summary
    assert summary == "greyscale 20x20 from 3 files, 3 of them resized and cropped to 20x20"


def test_exif_orientation_turns_photos_upright(tmp_path):
    stored = np.zeros((10, 30), dtype=np.uint8)  # 30 wide, 10 high as stored
    stored[:, :3] = 255  # the left edge white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    save(tmp_path / "photo.jpg", stored, exif=exif, quality=100)
    save(tmp_path / "upright.jpg", constant(0, (30, 10)))
    image = all_images(load_images(str(tmp_path)))[0, 0].numpy().astype(int)
    assert image.shape == (30, 10)  # upright: 10 wide, 30 high
    assert image[:3].mean() > 200 and image[5:].mean() < 30  # the stored left edge is now at the top


def test_a_corrupt_or_foreign_file_is_an_error_naming_it(tmp_path):
    save(tmp_path / "good.png", constant(1, (60, 60)))
    save(tmp_path / "cut.png", np.random.default_rng(0).integers(0, 256, (60, 60), dtype=np.uint8))
    whole = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])  # the header is whole, the pixels cut off
    with pytest.raises(ConfigError, match=f"cannot decode the image file {tmp_path / 'cut.png'} .*remove or replace"):
        load_images(str(tmp_path))
    (tmp_path / "cut.png").unlink()
    (tmp_path / "text.jpg").write_text("not a JPEG at all")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'text.jpg'} is not a readable image file"):
        load_images(str(tmp_path))


def test_a_folder_without_images_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="holds no PNG, JPEG, BMP, GIF or WebP files$"):
        load_images(str(tmp_path))
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(ConfigError, match=r"holds no PNG, JPEG, BMP, GIF or WebP files \(it holds 1 other file\)"):
        load_images(str(tmp_path))


def test_num_images_reads_a_fixed_random_choice_of_the_files(tmp_path):
    for i in range(30):
        save(tmp_path / f"{i:02d}.png", constant(i))
    data = load_images(str(tmp_path), num_images=10)
    subset = data.subset("all")
    assert len(subset.images) == 10 and subset.index.tolist() != list(range(10))
    assert subset.images[:, 0, 0, 0].tolist() == subset.index.tolist()  # image i holds the value i
    assert torch.equal(load_images(str(tmp_path), num_images=10).subset("all").index, subset.index)
    with pytest.raises(ConfigError, match="num_images 31 is more than the 30 image files"):
        load_images(str(tmp_path), num_images=31)


def test_a_folder_larger_than_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    for i in range(4):
        save(tmp_path / f"{i}.png", constant(i, (20, 30)))
    decode = image_folder._decode
    monkeypatch.setattr(data_module, "available_memory", lambda: 4799)
    monkeypatch.setattr(image_folder, "_decode", lambda *args: pytest.fail("decoded"))
    # 4 images of 1x20x30 bytes, and the training and held-out copies: 4,800 bytes.
    with pytest.raises(ConfigError, match=r"the 4 images of .* \(1x20x30 uint8\) would need about 0.0 GiB of memory, "
                       r"and 0.0 GiB is available; use a smaller --num-images or --image-size"):
        load_images(str(tmp_path))
    monkeypatch.setattr(data_module, "available_memory", lambda: 4800)
    monkeypatch.setattr(image_folder, "_decode", decode)
    assert len(all_images(load_images(str(tmp_path)))) == 4


def test_reading_in_parallel_gives_the_images_of_one_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(image_folder, "IMAGES_PER_TASK", 3)  # many tasks from a few files
    rng = np.random.default_rng(1)
    for i in range(20):
        save(tmp_path / f"{i:02d}.png", rng.integers(0, 256, (7, 7, 3), dtype=np.uint8))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = load_images(str(tmp_path))
        torch.set_num_threads(4)
        four = load_images(str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(all_images(one), all_images(four)) and fingerprint(one) == fingerprint(four)


def test_the_fingerprint_covers_names_sizes_and_pixels_and_not_where_the_folder_is(tmp_path):
    for i in range(5):
        save(tmp_path / "a" / f"{i}.bmp", constant(i))  # BMP: the byte size depends on the image's size only
    first = fingerprint(load_images(str(tmp_path / "a")))
    assert first["files"] and first["images"] == 5 and first["dtype"] == "uint8"
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    assert fingerprint(load_images(str(tmp_path / "moved"))) == first
    save(tmp_path / "a" / "3.bmp", constant(77))  # the same names and sizes, other pixels
    changed = fingerprint(load_images(str(tmp_path / "a")))
    assert changed["files"] == first["files"] and changed["blake2b"] != first["blake2b"]
    save(tmp_path / "a" / "3.bmp", constant(3))
    os.rename(tmp_path / "a" / "3.bmp", tmp_path / "a" / "3b.bmp")  # renamed, same order: the same pixels
    renamed = fingerprint(load_images(str(tmp_path / "a")))
    assert renamed["blake2b"] == first["blake2b"] and renamed["files"] != first["files"]


def test_image_size_is_for_folders_only():
    with pytest.raises(ConfigError, match="--image-size applies to a folder of image files, not to digits"):
        load_images("digits", image_size=8)


def test_a_missing_path_is_named_as_such(tmp_path):
    with pytest.raises(ConfigError, match=f"no such data file or folder: {tmp_path / 'nope'}"):
        load_images(str(tmp_path / "nope"))


# --- the command line --------------------------------------------------------------------------------------------

QUICK = ["--batch-size", 8, "--steps", 2, "--eval-k", 2, "--hidden", 16, "--latent-dim", 2]


def digit_folder(folder, n=40, size=(8, 8)):
    rng = np.random.default_rng(0)
    for i in range(n):
        save(folder / f"class{i % 2}" / f"{i:03d}.bmp", rng.integers(0, 256, size, dtype=np.uint8))
    (folder / "README.txt").write_text("40 noise images")


def test_train_eval_encode_and_resume_on_a_folder_and_refusing_a_changed_one(tmp_path):
    digit_folder(tmp_path / "digits")
    out = tmp_path / "run"
    status, stdout, stderr = run("train", "--data", tmp_path / "digits", *QUICK, "--out", out)
    assert status == 0, stderr
    assert "on digits (36 images, 4 held out; greyscale 8x8 from 40 files; 1 other file skipped)" in stderr
    checkpoint = torch.load(out / FILES["checkpoint"], weights_only=True)
    assert checkpoint["config"]["data"] == str(tmp_path / "digits") and "files" in checkpoint["data"]
    assert (out / "latents.png").exists()  # latent size 2

    status, stdout, stderr = run("eval", out, "--k", 2)
    assert status == 0 and "on digits" in stdout, stderr
    status, stdout, stderr = run("encode", out, "--split", "test", "--out", tmp_path / "z.npz")
    assert status == 0, stderr
    codes = np.load(tmp_path / "z.npz")
    assert codes["codes"].shape == (4, 2) and "labels" not in codes
    names = sorted(f"class{i % 2}/{i:03d}.bmp" for i in range(40))
    assert codes["files"].tolist() == [names[i] for i in codes["index"]]
    assert status == 0 and run("train", "--out", out, "--resume", "--steps", 3)[0] == 0

    before = snapshot(out)
    pixels = np.asarray(Image.open(tmp_path / "digits" / "class1" / "013.bmp")).copy()
    pixels[0, 0] ^= 1  # one pixel of one file; its name and size stay
    save(tmp_path / "digits" / "class1" / "013.bmp", pixels)
    for argv in (["eval", out], ["train", "--out", out, "--resume", "--steps", 4]):
        assert_one_line_error(*run(*argv)[:3:2], "is not what the checkpoint", "40 images of 1x8x8 uint8")
    pixels[0, 0] ^= 1
    save(tmp_path / "digits" / "class1" / "013.bmp", pixels)
    os.rename(tmp_path / "digits" / "class1" / "013.bmp", tmp_path / "digits" / "class1" / "013b.bmp")
    assert_one_line_error(*run("eval", out)[:3:2], "is not what the checkpoint", ", files ")
    assert snapshot(out) == before

    shutil.move(tmp_path / "digits" / "class1" / "013b.bmp", tmp_path / "digits" / "class1" / "013.bmp")
    shutil.move(tmp_path / "digits", tmp_path / "moved")  # the run's folder, moved: --data points at it
    status, _, stderr = run("train", "--out", out, "--resume", "--steps", 4, "--data", tmp_path / "moved")
    assert status == 0 and f"--data {tmp_path / 'digits'} -> {tmp_path / 'moved'}" in stderr


def test_a_folder_of_mixed_sizes_trains_at_image_size_and_keeps_it(tmp_path):
    digit_folder(tmp_path / "mixed", n=20)
    save(tmp_path / "mixed" / "big.png", constant(9, (20, 30)))
    out = tmp_path / "run"
    status, _, stderr = run("train", "--data", tmp_path / "mixed", *QUICK, "--out", out)
    assert_one_line_error(status, stderr, "holds images of 2 sizes", "pass --image-size S")
    assert not out.exists()
    status, _, stderr = run("train", "--data", tmp_path / "mixed", "--image-size", 8, *QUICK, "--out", out)
    assert status == 0 and "greyscale 8x8 from 21 files, 1 of them resized and cropped to 8x8" in stderr, stderr
    assert run("eval", out, "--k", 2)[0] == 0  # the run's --image-size, kept
    status, _, stderr = run("encode", out, "--out", tmp_path / "z.npz")
    assert status == 0 and np.load(tmp_path / "z.npz")["codes"].shape == (21, 2), stderr
    status, _, stderr = run("encode", out, "--image-size", 16, "--out", tmp_path / "z16.npz")
    assert_one_line_error(status, stderr, "holds 1x16x16 images", "trained on 1x8x8 images")
    status, _, stderr = run("train", "--out", out, "--resume", "--steps", 3, "--image-size", 16)
    assert_one_line_error(status, stderr, "image_size=8, not 16")


@pytest.mark.parametrize(
    "make, fragments",
    [
        (lambda folder: folder.mkdir(), ["holds no PNG, JPEG, BMP, GIF or WebP files"]),
        (lambda folder: (digit_folder(folder, n=4), (folder / "x.png").write_bytes(b"\x89PNG broken")),
         ["x.png is not a readable image file"]),
    ],
)
def test_bad_folders_are_one_line_errors_that_write_nothing(tmp_path, make, fragments):
    make(tmp_path / "images")
    status, _, stderr = run("train", "--data", tmp_path / "images", *QUICK, "--out", tmp_path / "run")
    assert_one_line_error(status, stderr, *fragments)
    assert not (tmp_path / "run").exists()
