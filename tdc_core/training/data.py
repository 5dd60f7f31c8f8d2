"""Images in, minibatches out.

:func:`load_images` reads one of the supported sources into a uint8 tensor ``[N x C x H x W]``
(C = ``data.channels``, H = W = ``data.image_size``). Only ``digits`` is resized; every other
source must already hold images of ``data.image_size`` pixels, because silently resampling a
benchmark dataset would change what its FID numbers mean. Channels are converted where needed
(RGB -> gray with ITU-R 601 luma weights, gray -> RGB by repetition).

Every bad input raises :class:`~tdc_core.errors.DataError` with one message that names the file
or folder and says what is allowed; no library traceback reaches the user.

Models see floats in ``[-1, 1]`` (:func:`to_model_range`); :class:`BatchSampler` draws
deterministic, exactly resumable minibatches.
"""

from __future__ import annotations

import codecs
import hashlib
import pickle
import re
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from tdc_core.config import DataConfig
from tdc_core.errors import DataError

try:  # numpy >= 2 moved numpy.core to numpy._core
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer

__all__ = [
    "BatchSampler",
    "DataPeek",
    "dataset_fingerprint",
    "load_images",
    "peek_images",
    "split_heldout",
    "to_model_range",
    "to_uint8",
]

_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
# PIL modes of 8-bit pixels. 16-bit or float images (modes I;16, I, F) would be clipped to 0..255
# by convert(), i.e. silently become almost white: they are refused instead.
_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
_LUMA_601 = (299, 587, 114)  # ITU-R BT.601 weights, per mille
_CIFAR_SIZE = 32
# What reading a corrupt or truncated npz can raise (numpy, zipfile, zlib, the OS). zipfile
# answers flipped flag bits with RuntimeError ("encrypted") or NotImplementedError ("strong
# encryption", "zip file version"); a header claiming a huge array with MemoryError/OverflowError.
_NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, RuntimeError,
               NotImplementedError, MemoryError, OverflowError)
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)


# --- public API --------------------------------------------------------------------------------


def load_images(cfg: DataConfig) -> torch.Tensor:
    """Load the images described by ``cfg``.

    Returns:
        uint8 tensor ``[N x C x H x W]`` on the CPU, contiguous, with C = ``cfg.channels`` and
        H = W = ``cfg.image_size``; N is capped at ``cfg.max_images`` (the first N in the
        source's deterministic order: file order, then row order).

    Raises:
        DataError: missing path, empty folder, corrupt file, or images of the wrong size,
            dtype or channel count; the message names the file or folder.
    """
    limit = cfg.max_images
    arr = _LOADERS[cfg.source](cfg, limit=limit)
    if limit is not None:
        arr = arr[:limit]
    if arr.shape[0] == 0:
        raise DataError(f"data source {cfg.source!r} at {cfg.path} holds no images")
    _check_size(arr, cfg)
    arr = _match_channels(arr, channels=cfg.channels)
    # Own, writable, C-contiguous memory: a view would keep a larger source array alive.
    return torch.from_numpy(np.require(arr, dtype=np.uint8, requirements=["C", "W", "O"]))


@dataclass(frozen=True)
class DataPeek:
    """What a cheap look at a data source found (:func:`peek_images`)."""

    num_images: int        # images training will use (after data.max_images), or a lower bound
    exact: bool            # False: num_images counts only the files read (a lower bound)
    sample: torch.Tensor   # uint8 [n, C, H, W]: the first few images exactly as load_images gives them


def peek_images(cfg: DataConfig, *, num: int = 4) -> DataPeek:
    """Check a data source without loading it: open it, read its headers (array shapes and
    dtypes, file lists) and decode the first ``num`` images, through the same checks as
    :func:`load_images` (size, dtype, channels). Costs well under a second for every source:
    an ImageNet-64 batch file's header is read, not its 1.5 GB of pixels.

    Raises:
        DataError: as :func:`load_images` would, for the part of the source it reads.
    """
    limit = cfg.max_images
    count, exact, arr = _PEEKERS.get(cfg.source, _peek_by_loading)(cfg, num=num)
    if limit is not None:
        count = min(count, limit)
    if count == 0 or arr.shape[0] == 0:
        raise DataError(f"data source {cfg.source!r} at {cfg.path} holds no images")
    arr = arr[:num]
    _check_size(arr, cfg)
    arr = _match_channels(arr, channels=cfg.channels)
    return DataPeek(num_images=int(count), exact=exact,
                    sample=torch.from_numpy(np.require(arr, dtype=np.uint8, requirements=["C", "W", "O"])))


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels ``[N x C x H x W]`` in ``0..255`` to float32 in ``[-1, 1]``."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects uint8 images, got {images_uint8.dtype}")
    return images_uint8.to(torch.float32) / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_model_range`: floats in ``[-1, 1]`` to uint8, clamped and rounded."""
    return ((images.to(torch.float32) + 1.0) * 127.5).clamp(0.0, 255.0).round().to(torch.uint8)


def split_heldout(
    images: torch.Tensor, *, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``[N x ...]`` images into ``(train, heldout)`` by a seeded random permutation.

    The held-out part has ``max(1, round(N * fraction))`` images (at most N - 1), so both parts
    are non-empty. Each part keeps the source order; the split depends only on N, ``fraction``
    and ``seed``.

    Raises:
        DataError: fewer than 2 images.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n = images.shape[0]
    if n < 2:
        raise DataError(f"need at least 2 images to split off a held-out set, got {n}")
    num_heldout = min(n - 1, max(1, round(n * fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    heldout_idx, _ = perm[:num_heldout].sort()
    train_idx, _ = perm[num_heldout:].sort()
    return images[train_idx], images[heldout_idx]


class BatchSampler:
    """Infinite minibatches drawn epoch by epoch from a uint8 image tensor ``[N x C x H x W]``.

    Every epoch is a fresh random permutation; a batch that reaches the end of an epoch is
    completed from the next one, so every batch has exactly ``batch_size`` images (even when
    N < ``batch_size``). All randomness (permutations and flips) comes from the sampler's own
    generator, whose state is part of :meth:`state_dict`: a sampler restored from a state
    continues with exactly the batches the saved one would have drawn.
    """

    def __init__(
        self, images: torch.Tensor, *, batch_size: int, seed: int, random_flip: bool = False
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(
                f"BatchSampler expects non-empty uint8 images [N, C, H, W], got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images = images
        self.batch_size = batch_size
        self.random_flip = random_flip
        self._generator = torch.Generator().manual_seed(seed)
        self._perm = self._new_permutation()
        self._position = 0  # index into self._perm of the next image
        self._epoch = 0  # completed passes over the data

    @property
    def epoch(self) -> int:
        """Number of completed passes over the images."""
        return self._epoch

    def next_batch(self) -> torch.Tensor:
        """The next minibatch: float32 ``[B x C x H x W]`` in ``[-1, 1]`` on the CPU."""
        batch = to_model_range(self.images[self._next_indices()])
        if self.random_flip:
            flip = torch.rand(self.batch_size, generator=self._generator) < 0.5
            batch[flip] = batch[flip].flip(-1)
        return batch

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """Everything needed to resume: tensors and ints only (``weights_only`` loadable)."""
        return {
            "generator": self._generator.get_state(),
            "permutation": self._perm.clone(),
            "position": self._position,
            "epoch": self._epoch,
            "num_images": self.images.shape[0],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` saved by a sampler over the same images.

        Raises:
            DataError: the state is malformed or was saved for a different number of images.
        """
        n = self.images.shape[0]
        missing = {"generator", "permutation", "position", "epoch", "num_images"} - set(state)
        if missing:
            raise DataError(f"sampler state lacks {sorted(missing)}")
        if int(state["num_images"]) != n:
            raise DataError(
                f"sampler state was saved for {int(state['num_images'])} images; this dataset "
                f"has {n}"
            )
        perm = torch.as_tensor(state["permutation"], dtype=torch.int64)
        position = int(state["position"])
        if perm.shape != (n,) or not 0 <= position < n:
            raise DataError(
                f"sampler state is inconsistent: permutation shape {tuple(perm.shape)}, "
                f"position {position}, for {n} images"
            )
        self._generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8).clone())
        self._perm = perm.clone()
        self._position = position
        self._epoch = int(state["epoch"])

    def _new_permutation(self) -> torch.Tensor:
        return torch.randperm(self.images.shape[0], generator=self._generator)

    def _next_indices(self) -> torch.Tensor:
        n = self.images.shape[0]
        parts, needed = [], self.batch_size
        while needed:
            take = min(needed, n - self._position)
            parts.append(self._perm[self._position : self._position + take])
            self._position += take
            needed -= take
            if self._position == n:  # epoch done: reshuffle now so the state stays simple
                self._perm = self._new_permutation()
                self._position = 0
                self._epoch += 1
        return torch.cat(parts)


def dataset_fingerprint(cfg: DataConfig, images: torch.Tensor) -> str:
    """16 hex chars of sha256 over the source, image size, channels and the image bytes.

    Independent of ``cfg.path``, so moving a dataset keeps its cached statistics valid.
    """
    digest = hashlib.sha256()
    header = f"{cfg.source}|{cfg.image_size}|{cfg.channels}|{images.dtype}|{tuple(images.shape)}"
    digest.update(header.encode())
    digest.update(images.detach().cpu().contiguous().numpy())  # buffer protocol: no copy
    return digest.hexdigest()[:16]


# --- sources: each returns uint8 [N, C, H, W] with C in {1, 3} ---------------------------------


def _load_digits(cfg: DataConfig, *, limit: int | None) -> np.ndarray:
    """scikit-learn's 1797 8x8 digits (values 0..16), bilinearly resized to ``image_size``."""
    values = _digits_values()[:limit]  # [N, 8, 8] float64 in 0..16
    pixels = np.rint(values * 255.0 / 16.0).astype(np.uint8)[:, None]
    if cfg.image_size == pixels.shape[-1]:
        return pixels
    resized = F.interpolate(
        torch.from_numpy(pixels).to(torch.float32),
        size=(cfg.image_size, cfg.image_size),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    return resized.round().clamp(0, 255).to(torch.uint8).numpy()


def _digits_values() -> np.ndarray:
    """scikit-learn's digits as ``[1797, 8, 8]`` float64 in 0..16, read straight from the
    ``digits.csv.gz`` it ships (as ``sklearn.datasets.load_digits`` does): importing
    scikit-learn takes 2-4 s, ten times the read. Falls back to ``load_digits`` when the file is
    not where this scikit-learn keeps it."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        csv = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            with gzip.open(csv, "rt") as f:
                data = np.loadtxt(f, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8)  # the last column is the label
    from sklearn.datasets import load_digits

    return load_digits().images


def _load_cifar10(cfg: DataConfig, *, limit: int | None) -> np.ndarray:
    """The python version of CIFAR-10: ``data_batch_*`` pickles in ``cifar-10-batches-py``."""
    folder = _existing(cfg.path, want="folder")
    if not any(folder.glob("data_batch_*")) and (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    files = _natural_sorted(p for p in folder.glob("data_batch_*") if p.is_file())
    if not files:
        raise DataError(
            f"no data_batch_* files in {folder}; data.path must be the cifar-10-batches-py "
            f"folder of CIFAR-10's python version"
        )
    if cfg.image_size != _CIFAR_SIZE:
        raise DataError(
            f"CIFAR-10 images in {folder} are {_CIFAR_SIZE}x{_CIFAR_SIZE} but data.image_size="
            f"{cfg.image_size}; set data.image_size={_CIFAR_SIZE} (only the digits source is resized)"
        )
    return _concat_until(limit, (_read_cifar_batch(f) for f in files))


def _load_imagenet64(cfg: DataConfig, *, limit: int | None) -> np.ndarray:
    """Downsampled ImageNet (``Imagenet64_train_npz``): ``data`` rows of CHW pixels per file.

    A folder is read as its ``train_data_batch_*.npz`` files in numeric order, or as all its
    ``.npz`` files when there are none (so a stray ``val_data.npz`` never joins training).
    """
    path = _existing(cfg.path, want="either")
    if path.is_file():
        files = [path]
    else:
        files = _natural_sorted(path.glob("train_data_batch_*.npz")) or _natural_sorted(
            path.glob("*.npz")
        )
        if not files:
            raise DataError(
                f"no .npz files in {path}; data.path must be a downsampled-ImageNet batch file "
                f"or a folder of them (train_data_batch_1.npz, ...)"
            )
    return _concat_until(limit, (_read_imagenet_batch(f, cfg.image_size) for f in files))


def _load_folder(cfg: DataConfig, *, limit: int | None) -> np.ndarray:
    """Every .png/.jpg/.jpeg under the folder (recursive, sorted by path)."""
    folder = _existing(cfg.path, want="folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"folder {folder} holds no .png, .jpg or .jpeg images")
    files = files[:limit]
    size, mode = cfg.image_size, ("L" if cfg.channels == 1 else "RGB")
    out = np.empty((len(files), cfg.channels, size, size), dtype=np.uint8)
    for i, file in enumerate(files):
        pixels = _read_image(file, size=size, mode=mode)
        out[i] = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return out


def _load_npz(cfg: DataConfig, *, limit: int | None) -> np.ndarray:
    """One uint8 array ``[N,H,W]``, ``[N,H,W,C]`` or ``[N,C,H,W]`` (C in 1, 3) in an .npz."""
    file = _existing(cfg.path, want="file")
    arr = _read_npz_array(file, keys=("images", "arr_0"))
    if arr.dtype != np.uint8:
        raise DataError(f"{file} holds {arr.dtype} images {arr.shape}; only uint8 is allowed")
    return _to_nchw(arr, file=file, size=cfg.image_size)


_LOADERS: dict[str, Callable[..., np.ndarray]] = {
    "digits": _load_digits,
    "cifar10": _load_cifar10,
    "imagenet64": _load_imagenet64,
    "folder": _load_folder,
    "npz": _load_npz,
}


# --- peeking: headers and the first images only ----------------------------------------------


def _peek_by_loading(cfg: DataConfig, *, num: int) -> tuple[int, bool, np.ndarray]:
    """Small sources (digits): load them whole."""
    arr = _LOADERS[cfg.source](cfg, limit=cfg.max_images)
    return arr.shape[0], True, arr[:num]


def _peek_cifar10(cfg: DataConfig, *, num: int) -> tuple[int, bool, np.ndarray]:
    """Reads the first batch file (30 MB); the others are only listed, so the count is a lower
    bound unless there is one file."""
    folder = _existing(cfg.path, want="folder")
    if not any(folder.glob("data_batch_*")) and (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    files = _natural_sorted(p for p in folder.glob("data_batch_*") if p.is_file())
    first = _load_cifar10(cfg, limit=1)  # the same checks (files present, image size), one file read
    return first.shape[0], len(files) == 1, first[:num]


def _peek_npz_like(cfg: DataConfig, *, num: int) -> tuple[int, bool, np.ndarray]:
    """npz / imagenet64: every file's array header (shape, dtype), the first file's first rows."""
    if cfg.source == "npz":
        file = _existing(cfg.path, want="file")
        shape, dtype, head = _npz_header(file, keys=("images", "arr_0"), rows=num)
        if dtype != np.uint8:
            raise DataError(f"{file} holds {dtype} images {shape}; only uint8 is allowed")
        # The shape checks on a zero-stride view of the whole array (no memory), so the
        # message gives the file's real shape; then the rows read.
        _to_nchw(np.broadcast_to(np.zeros((), np.uint8), shape), file=file, size=cfg.image_size)
        return shape[0], True, _to_nchw(head, file=file, size=cfg.image_size)
    path = _existing(cfg.path, want="either")
    files = [path] if path.is_file() else (
        _natural_sorted(path.glob("train_data_batch_*.npz")) or _natural_sorted(path.glob("*.npz")))
    if not files:
        raise DataError(f"no .npz files in {path}; data.path must be a downsampled-ImageNet batch file "
                        f"or a folder of them (train_data_batch_1.npz, ...)")
    total, sample = 0, None
    for file in files:
        shape, dtype, head = _npz_header(file, keys=("data",), only_preferred=True, rows=num if sample is None else 0)
        if sample is None:
            sample = _imagenet_rows(head if dtype == np.uint8 else np.empty((0, *shape[1:]), dtype), file=file,
                                    shape=shape, dtype=dtype, image_size=cfg.image_size)
        elif dtype != np.uint8 or len(shape) != 2 or shape[1] != sample[0].size:
            raise DataError(f"{file}: 'data' is {dtype} {shape}; allowed: uint8 [N, {sample[0].size}] like "
                            f"{files[0].name}")
        total += shape[0]
    return total, True, sample


def _peek_folder(cfg: DataConfig, *, num: int) -> tuple[int, bool, np.ndarray]:
    """Lists the files, decodes the first ``num``."""
    folder = _existing(cfg.path, want="folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"folder {folder} holds no .png, .jpg or .jpeg images")
    return len(files), True, _load_folder(cfg, limit=num)


_PEEKERS: dict[str, Callable[..., tuple[int, bool, np.ndarray]]] = {
    "cifar10": _peek_cifar10,
    "imagenet64": _peek_npz_like,
    "npz": _peek_npz_like,
    "folder": _peek_folder,
}


def _npz_header(file: Path, *, keys: tuple[str, ...], rows: int,
                only_preferred: bool = False) -> tuple[tuple[int, ...], np.dtype, np.ndarray]:
    """(shape, dtype, first ``rows`` rows) of the array :func:`_read_npz_array` would return,
    from the .npy header inside the archive: no more than those rows is decompressed."""
    try:
        if not zipfile.is_zipfile(file):  # a bare .npy
            with file.open("rb") as f:
                return _npy_stream_header(f, rows=rows)
        with zipfile.ZipFile(file) as zf:
            key = _array_key(file, [n.removesuffix(".npy") for n in zf.namelist()], keys=keys,
                             only_preferred=only_preferred)
            with zf.open(key + ".npy") as f:
                return _npy_stream_header(f, rows=rows)
    except _NPZ_ERRORS as exc:
        raise DataError(f"cannot read {file} as a numpy .npz archive: {_one_line(_npz_failure(exc))}") from None


def _npy_stream_header(f, *, rows: int) -> tuple[tuple[int, ...], np.dtype, np.ndarray]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    if fortran or len(shape) == 0:
        # Column-major rows are not contiguous: decode them only when the source is loaded.
        return tuple(shape), dtype, np.empty((0, *shape[1:]), dtype)
    n = min(rows, shape[0])
    per_row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    data = f.read(n * per_row)
    if len(data) != n * per_row:
        raise ValueError(f"file ends after {len(data)} of the first rows' {n * per_row} bytes")
    return tuple(shape), dtype, np.frombuffer(data, dtype=dtype).reshape(n, *shape[1:])


def _imagenet_rows(head: np.ndarray, *, file: Path, shape: tuple[int, ...], dtype: np.dtype,
                   image_size: int) -> np.ndarray:
    """The checks of :func:`_read_imagenet_batch` on a header and its first rows."""
    if dtype != np.uint8 or len(shape) != 2:
        raise DataError(f"{file}: 'data' is {dtype} {shape}; allowed: uint8 [N, 3*S*S] rows of CHW pixels")
    size = int(round((shape[1] / 3) ** 0.5))
    if 3 * size * size != shape[1]:
        raise DataError(f"{file}: rows of {shape[1]} values are not 3*S*S pixels of a square RGB image")
    if size != image_size:
        raise DataError(f"{file} holds {size}x{size} images but data.image_size={image_size}; set "
                        f"data.image_size={size} (only the digits source is resized)")
    return head.reshape(-1, 3, size, size)


# --- file readers ------------------------------------------------------------------------------


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, nothing else.

    Unpickling can run arbitrary code; a dataset file is untrusted input, so only the
    callables numpy's own array pickles use are resolved (old and new module names), plus
    ``_codecs.encode``, which Python 3 pickles of protocol <= 2 use for every bytes object
    (a text-to-bytes conversion; it runs no code).
    """

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("_codecs", "encode"): codecs.encode,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _read_cifar_batch(file: Path) -> np.ndarray:
    try:
        with file.open("rb") as f:
            batch = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - a corrupt pickle can raise nearly any type
        raise DataError(
            f"cannot read CIFAR-10 batch {file}: {_one_line(exc)}; only a dict of numpy arrays and "
            f"lists is allowed"
        ) from None
    if not isinstance(batch, dict) or b"data" not in batch:
        got = f"keys {list(batch)}" if isinstance(batch, dict) else f"a {type(batch).__name__}"
        raise DataError(f"CIFAR-10 batch {file} must be a dict with key b'data'; got {got}")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or (
        data.shape[1] != 3 * _CIFAR_SIZE * _CIFAR_SIZE
    ):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"CIFAR-10 batch {file}: b'data' must be uint8 [N, 3072]; got {got}")
    return data.reshape(-1, 3, _CIFAR_SIZE, _CIFAR_SIZE)


def _read_imagenet_batch(file: Path, image_size: int) -> np.ndarray:
    data = _read_npz_array(file, keys=("data",), only_preferred=True)
    if data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(
            f"{file}: 'data' is {data.dtype} {data.shape}; allowed: uint8 [N, 3*S*S] rows of "
            f"CHW pixels"
        )
    size = int(round((data.shape[1] / 3) ** 0.5))
    if 3 * size * size != data.shape[1]:
        raise DataError(
            f"{file}: rows of {data.shape[1]} values are not 3*S*S pixels of a square RGB image"
        )
    if size != image_size:
        raise DataError(
            f"{file} holds {size}x{size} images but data.image_size={image_size}; set "
            f"data.image_size={size} (only the digits source is resized)"
        )
    return data.reshape(-1, 3, size, size)


def _read_npz_array(file: Path, *, keys: tuple[str, ...], only_preferred: bool = False) -> np.ndarray:
    """The first of ``keys`` in an .npz (else its only array); a bare .npy is accepted too."""
    try:
        loaded = np.load(file, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded as npz:
            return npz[_array_key(file, list(npz.files), keys=keys, only_preferred=only_preferred)]
    except _NPZ_ERRORS as exc:
        raise DataError(f"cannot read {file} as a numpy .npz archive: {_one_line(_npz_failure(exc))}") from None


def _array_key(file: Path, names: list[str], *, keys: tuple[str, ...], only_preferred: bool) -> str:
    """The first of ``keys`` among an archive's array ``names``, else its only array."""
    key = next((k for k in keys if k in names), None)
    if key is None and len(names) == 1 and not only_preferred:
        key = names[0]
    if key is None:
        raise DataError(
            f"{file} has arrays {names}; expected {' or '.join(map(repr, keys))}"
            + ("" if only_preferred else " or a single array")
        )
    return key


def _npz_failure(exc: Exception) -> str:
    """numpy's reason, minus its advice to pass allow_pickle=True (never safe here)."""
    text = str(exc)
    if "Object arrays" in text:
        return "it holds object (pickled) arrays; only plain uint8 arrays are allowed"
    if "allow_pickle" in text:
        return "it is neither an .npz nor an .npy file"
    return text


def _read_image(file: Path, *, size: int, mode: str) -> np.ndarray:
    """Pixels of one image file, ``[H, W]`` (mode L) or ``[H, W, 3]`` (mode RGB)."""
    try:
        with Image.open(file) as img:
            if img.size != (size, size):
                raise DataError(
                    f"image {file} is {img.size[0]}x{img.size[1]}; every image must be "
                    f"{size}x{size} (data.image_size; only the digits source is resized)"
                )
            if img.mode not in _EIGHT_BIT_MODES:
                raise DataError(
                    f"image {file} has {img.mode} pixels (16-bit or float); allowed: 8-bit grayscale, "
                    f"palette or RGB(A) images"
                )
            return np.asarray(img.convert(mode))
    except _IMAGE_ERRORS as exc:
        raise DataError(
            f"cannot read image {file}: {_one_line(exc)}; allowed: intact .png, .jpg or .jpeg files"
        ) from None


# --- helpers -----------------------------------------------------------------------------------


def _existing(path: Path | None, *, want: str) -> Path:
    """``path`` with ``~`` expanded, checked to exist as a ``file``, ``folder`` or ``either``."""
    if path is None:
        raise DataError("data.path is required for this data source")
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data.path {path} does not exist")
    if want == "folder" and not path.is_dir():
        raise DataError(f"data.path {path} must be a folder")
    if want == "file" and not path.is_file():
        raise DataError(f"data.path {path} must be a file")
    return path


def _one_line(exc: BaseException | str, limit: int = 300) -> str:
    """A library's reason folded onto one line (the CLI prints each error as one line)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _natural_sorted(paths: Iterable[Path]) -> list[Path]:
    """Sort so that ``batch_2`` comes before ``batch_10``."""

    def key(path: Path) -> list[Any]:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]

    return sorted(paths, key=key)


def _concat_until(limit: int | None, batches: Iterable[np.ndarray]) -> np.ndarray:
    """Concatenate batches, reading no further once ``limit`` images are in hand."""
    parts, count = [], 0
    for batch in batches:
        parts.append(batch)
        count += batch.shape[0]
        if limit is not None and count >= limit:
            break
    return np.concatenate(parts)


def _to_nchw(arr: np.ndarray, *, file: Path, size: int) -> np.ndarray:
    """``[N,H,W]``, ``[N,H,W,C]`` or ``[N,C,H,W]`` (C in 1, 3) to ``[N,C,H,W]``."""
    allowed = "uint8 [N,H,W], [N,H,W,C] or [N,C,H,W] with C in (1, 3)"
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        nchw = arr.shape[1] in (1, 3) and arr.shape[2] == arr.shape[3]
        nhwc = arr.shape[3] in (1, 3) and arr.shape[1] == arr.shape[2]
        if not (nchw or nhwc):
            raise DataError(f"{file} holds images of shape {arr.shape}; allowed: {allowed}")
        if not nchw:
            arr = arr.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{file} holds an array of shape {arr.shape}; allowed: {allowed}")
    if arr.shape[2:] != (size, size):
        raise DataError(
            f"{file} holds {arr.shape[2]}x{arr.shape[3]} images but data.image_size={size}; "
            f"allowed: {size}x{size} (only the digits source is resized)"
        )
    return arr


def _check_size(arr: np.ndarray, cfg: DataConfig) -> None:
    """Last line of defence: every loader must deliver ``image_size`` pixels."""
    if arr.shape[2:] != (cfg.image_size, cfg.image_size):
        raise DataError(
            f"data source {cfg.source!r} at {cfg.path} gave {arr.shape[2]}x{arr.shape[3]} "
            f"images; data.image_size={cfg.image_size}"
        )


def _match_channels(arr: np.ndarray, *, channels: int) -> np.ndarray:
    """Gray -> RGB by repetition, RGB -> gray by ITU-R 601 luma; ``[N,C,H,W]`` uint8."""
    have = arr.shape[1]
    if have == channels:
        return arr
    if have == 1:
        return np.repeat(arr, channels, axis=1)
    return _luma(arr)


def _luma(rgb: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """``[N,3,H,W]`` -> ``[N,1,H,W]``, in chunks to bound the int32 temporary."""
    out = np.empty((rgb.shape[0], 1, *rgb.shape[2:]), dtype=np.uint8)
    weights = np.asarray(_LUMA_601, dtype=np.int32).reshape(1, 3, 1, 1)
    for start in range(0, rgb.shape[0], chunk):
        block = rgb[start : start + chunk].astype(np.int32)
        out[start : start + chunk] = ((block * weights).sum(axis=1, keepdims=True) + 500) // 1000
    return out
