"""A folder of image files as a dataset: what ``fastvae train --data DIR`` reads (:func:`read_image_folder`).

Every PNG, JPEG, BMP, GIF or WebP file under the folder, recursively, is
read with Pillow, in a fixed order (relative paths sorted; hidden files and
folders, whose names start with ``.``, are left out); other files are
skipped and counted. The images are greyscale when every one of them is
(palette images with a grey palette count as grey), RGB otherwise, with any
alpha channel dropped; JPEG and WebP photos are turned upright by their EXIF
orientation. Images of one size are used as they are; with ``image_size=S``
every image's shorter side is resized to ``S`` (Lanczos) and its centre
cropped to ``S x S``, and without it images of different sizes are an error.

Reading takes two passes, each spread over threads (Pillow decodes and
resizes without holding the GIL) with a progress bar: the headers first
(Pillow's ``open`` reads no pixels), which give the final shape, so that a
folder larger than memory is refused before any pixel is decoded, and mixed
sizes before the long pass; then the pixels, decoded once into one ``uint8``
array held in memory (every epoch of a run reads that array; nothing is
decoded twice in a command). A file that Pillow cannot read is an error
naming it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from fastvae.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
IMAGE_KINDS = "PNG, JPEG, BMP, GIF or WebP"
# Pillow modes of one grey channel (with alpha, or of more than 8 bits).
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
# The formats whose EXIF orientation Pillow reads with the header (a PNG's eXIf chunk may follow its pixels).
EXIF_FORMATS = {"JPEG", "MPO", "WEBP"}
EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # rotated by 90 or 270 degrees: width and height swap
IMAGES_PER_TASK = 64
SIZES_LISTED = 3


@dataclass(frozen=True)
class FolderFiles:
    """What a dataset read from a folder knows of its files (:attr:`fastvae.data.ImageData.files`)."""

    root: str
    names: tuple[str, ...]  # every image file of the folder, relative to it, '/'-separated, in the folder's order
    digest: str  # BLAKE2b of the names and byte sizes of the files whose images were read
    summary: str  # how they were read, for the run's start line: "3x64x64 from 1,000 files; 2 other files skipped"


@dataclass(frozen=True)
class FolderImages:
    """The images of a folder: ``images`` ``(N, C, H, W)`` ``uint8``, and ``positions`` ``(N,)`` int64, each
    image's place among ``files.names`` (``None``: all of them, in order)."""

    images: torch.Tensor
    positions: torch.Tensor | None
    files: FolderFiles


@dataclass(frozen=True)
class _Header:
    width: int  # upright (after the EXIF orientation)
    height: int
    grey: bool


def is_image_folder(source: str) -> bool:
    """Whether ``source`` names a folder (a dataset's name wins over a folder of that name: write ``./mnist``)."""
    from fastvae.data import DATASETS

    return source not in DATASETS and os.path.isdir(source)


def read_image_folder(
    root: str,
    *,
    num_images: int | None = None,
    image_size: int | None = None,
    choose: Callable[[int, int], torch.Tensor] | None = None,
    bar: Callable | None = None,
) -> FolderImages:
    """Read the images of the folder ``root`` (see the module's docstring).

    Args:
        num_images: read only this many, chosen by ``choose(num_images, total)`` (sorted positions among the
            folder's image files); ``None``: all of them.
        image_size: resize each image's shorter side to this and crop its centre to a square; ``None``: the
            images must all have one size.
        bar: ``bar(total=, desc=, unit=)`` returns a ``tqdm``-like progress bar (a context manager with
            ``update``); ``None``: no bars.

    Raises:
        ConfigError: no image files, a file Pillow cannot read (named), images of different sizes without
            ``image_size``, more images asked for than there are, or more than fit in memory.
    """
    from fastvae.data import check_fits_in_memory

    names, skipped = _list_files(root)
    if not names:
        raise ConfigError(
            f"{root} holds no {IMAGE_KINDS} files" + (f" (it holds {_count(skipped, 'other file')})" if skipped else "")
        )
    positions = None
    if num_images is not None and num_images != len(names):
        if num_images > len(names):
            raise ConfigError(
                f"num_images {num_images} is more than the {len(names)} image files of {root}; "
                "leave --num-images out to use all of them"
            )
        positions = choose(num_images, len(names))
    chosen = names if positions is None else [names[i] for i in positions.tolist()]
    paths = [os.path.join(root, name) for name in chosen]
    headers = _in_parallel(_read_header, paths, bar, "reading headers")
    channels = 1 if all(h.grey for h in headers) else 3
    height, width = _image_size(root, chosen, headers, image_size)
    what = f"the {len(paths):,} images of {root} ({channels}x{height}x{width} uint8)"
    # The decoded array, then the training and held-out copies load_images makes of it.
    check_fits_in_memory(2 * len(paths) * channels * height * width, what, "use a smaller --num-images or --image-size")
    images = np.empty((len(paths), channels, height, width), dtype=np.uint8)

    def decode(index: int) -> None:
        images[index] = _decode(paths[index], channels, image_size)

    _in_parallel(decode, range(len(paths)), bar, "decoding")
    files = FolderFiles(
        root,
        tuple(names),
        _digest(root, chosen),
        _summary(channels, height, width, len(paths), skipped, image_size, headers),
    )
    return FolderImages(torch.from_numpy(images), positions, files)


def _list_files(root: str) -> tuple[list[str], int]:
    """The image files under ``root`` (relative, '/'-separated, sorted) and how many other files it holds."""
    names, skipped = [], 0
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        relative = os.path.relpath(folder, root)
        for name in files:
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                names.append(name if relative == "." else f"{relative.replace(os.sep, '/')}/{name}")
            else:
                skipped += 1
    return sorted(names), skipped


def _in_parallel(work: Callable, items: Sequence, bar: Callable | None, desc: str) -> list:
    """``[work(item) for item in items]`` on ``torch.get_num_threads()`` threads, tasks of a few items each, with
    a progress bar; the first item (in order) that raises stops the rest, and its error is raised."""
    tasks = [items[start : start + IMAGES_PER_TASK] for start in range(0, len(items), IMAGES_PER_TASK)]
    results = []
    pool = ThreadPoolExecutor(max(1, torch.get_num_threads()))
    try:
        with _bar(bar, len(items), desc) as progress:
            for done in pool.map(lambda task: [work(item) for item in task], tasks):
                results += done
                progress.update(len(done))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def _bar(bar: Callable | None, total: int, desc: str):
    if bar is not None:
        return bar(total=total, desc=desc, unit="image")
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=True)


def _open(path: str):
    """``PIL.Image.open(path)`` (reads the header only); a file Pillow cannot identify is a :class:`ConfigError`."""
    from PIL import Image

    try:
        return Image.open(path)
    except Exception as err:  # UnidentifiedImageError, OSError, SyntaxError, ... from the format's parser
        raise ConfigError(f"{path} is not a readable image file ({_first_line(err)}); remove or replace it") from None


def _read_header(path: str) -> _Header:
    with _open(path) as image:
        width, height = image.size
        if _orientation(image) in TRANSPOSED_ORIENTATIONS:
            width, height = height, width
        return _Header(width, height, _is_grey(image))


def _orientation(image) -> int:
    if image.format not in EXIF_FORMATS:
        return 1
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block: the pixels may still be fine, and are read upright as stored
        return 1


def _is_grey(image) -> bool:
    """Whether ``image`` has one grey channel, or a palette of greys only (read from the header, no pixels)."""
    if image.mode in GREY_MODES:
        return True
    if image.mode not in ("P", "PA") or image.palette is None:
        return False
    rawmode = getattr(image.palette, "rawmode", None) or image.palette.mode
    if rawmode not in ("RGB", "RGBA", "RGBX"):
        return False
    colours = np.frombuffer(bytes(image.palette.palette), dtype=np.uint8)
    colours = colours[: len(colours) // len(rawmode) * len(rawmode)].reshape(-1, len(rawmode))
    return bool((colours[:, 0] == colours[:, 1]).all() and (colours[:, 1] == colours[:, 2]).all())


def _image_size(root: str, names: list[str], headers: list[_Header], image_size: int | None) -> tuple[int, int]:
    """``(H, W)`` of the images read: ``image_size`` squared, or the one size they all have."""
    if image_size is not None:
        return image_size, image_size
    sizes: dict[tuple[int, int], list[str]] = {}
    for name, header in zip(names, headers):
        sizes.setdefault((header.width, header.height), []).append(name)
    if len(sizes) == 1:
        width, height = next(iter(sizes))
        return height, width
    common = sorted(sizes.items(), key=lambda item: -len(item[1]))
    listed = "; ".join(f"{w}x{h}: {_count(len(n), 'image')}, such as {n[0]}" for (w, h), n in common[:SIZES_LISTED])
    more = f"; and {len(common) - SIZES_LISTED} more sizes" if len(common) > SIZES_LISTED else ""
    raise ConfigError(
        f"{root} holds images of {len(sizes)} sizes (width x height: {listed}{more}); pass --image-size S to "
        "resize each one's shorter side to S and crop its centre to S x S"
    )


def _decode(path: str, channels: int, image_size: int | None) -> np.ndarray:
    """The pixels of the image file ``path`` as ``(channels, H, W)`` uint8, resized and cropped to
    ``image_size`` if given; a file that does not decode is a :class:`ConfigError` naming it."""
    from PIL import Image, ImageOps

    try:
        with _open(path) as image:
            if _orientation(image) != 1:
                image = ImageOps.exif_transpose(image)
            image = _to_mode(image, "L" if channels == 1 else "RGB")
            if image_size is not None:
                image = ImageOps.fit(image, (image_size, image_size), Image.Resampling.LANCZOS)
            pixels = np.asarray(image, dtype=np.uint8)
    except ConfigError:
        raise
    except Exception as err:  # a truncated or damaged file: OSError, SyntaxError, ValueError, ...
        raise ConfigError(f"cannot decode the image file {path} ({_first_line(err)}); remove or replace it") from None
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def _to_mode(image, mode: str):
    """``image`` as 8-bit ``mode`` (``"L"`` or ``"RGB"``): alpha dropped, 16-bit greys scaled (not clipped) to 8."""
    from PIL import Image

    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(image).astype(np.float32) / 257  # 0..65535 -> 0..255
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")
    return image if image.mode == mode else image.convert(mode)


def _digest(root: str, names: list[str]) -> str:
    """BLAKE2b of the ``names`` (relative paths) and byte sizes of those files under ``root``, in order."""
    digest = hashlib.blake2b(digest_size=16)
    for name in names:
        digest.update(f"{name}\0{os.path.getsize(os.path.join(root, name))}\n".encode())
    return digest.hexdigest()


def _summary(
    channels: int, height: int, width: int, n: int, skipped: int, image_size: int | None, headers: list[_Header]
) -> str:
    colour = "greyscale" if channels == 1 else "RGB"
    words = f"{colour} {height}x{width} from {_count(n, 'file')}"
    if image_size is not None:
        resized = sum((h.width, h.height) != (image_size, image_size) for h in headers)
        words += f", {resized:,} of them resized and cropped to {image_size}x{image_size}" if resized else ""
    if skipped:
        words += f"; {_count(skipped, 'other file')} skipped"
    return words


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
