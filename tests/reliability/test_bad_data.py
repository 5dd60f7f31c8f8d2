"""Bad data: whatever a dataset file holds (corrupt, truncated, fuzzed, lying about its size,
wrong channels or bit depth), loading gives images of the configured shape or one DataError
line naming the file; never a library traceback."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tdc_core.config import DataConfig
from tdc_core.errors import DataError
from tdc_core.training.data import load_images

_RNG = np.random.default_rng(0)
_IMAGES = _RNG.integers(0, 256, size=(4, 3, 8, 8), dtype=np.uint8)


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npz_compressed(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _cifar_batch(data: object) -> bytes:
    return pickle.dumps({b"batch_label": b"x", b"labels": [0, 1, 2], b"data": data}, protocol=2)


def _image(fmt: str, pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


# name -> (file name, data.source, image_size, valid bytes); folder sources read the file's folder.
FORMATS = {
    "npz": ("images.npz", "npz", 8, _npz(images=_IMAGES)),
    "npz-compressed": ("images.npz", "npz", 8, _npz_compressed(images=_IMAGES)),
    "imagenet64": ("train_data_batch_1.npz", "imagenet64", 8,
                   _npz(data=_IMAGES.reshape(4, -1), labels=np.arange(4))),
    "cifar10": ("data_batch_1", "cifar10", 32,
                _cifar_batch(_RNG.integers(0, 256, size=(3, 3072), dtype=np.uint8))),
    "png": ("a.png", "folder", 8, _image("PNG", _IMAGES[0].transpose(1, 2, 0))),
    "jpeg": ("a.jpg", "folder", 8, _image("JPEG", _IMAGES[0].transpose(1, 2, 0))),
}


def _write(tmp_path: Path, fmt: str, content: bytes) -> DataConfig:
    name, source, size, _ = FORMATS[fmt]
    folder = tmp_path / fmt
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(content)
    path = folder if source in ("folder", "cifar10") else folder / name
    return DataConfig(source=source, path=path, image_size=size, channels=3)


def _assert_data_error(cfg: DataConfig, *needles: str) -> str:
    with pytest.raises(DataError) as err:
        load_images(cfg)
    text = str(err.value)
    assert text and "\n" not in text, f"not one line: {text!r}"
    for needle in needles:
        assert needle in text, f"{needle!r} missing from: {text}"
    return text


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_the_unbroken_files_load(tmp_path: Path, fmt: str) -> None:
    """Control for the fuzz test below: the files it corrupts are valid to begin with."""
    cfg = _write(tmp_path, fmt, FORMATS[fmt][3])
    x = load_images(cfg)
    assert x.shape[1:] == (3, cfg.image_size, cfg.image_size)


@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(fmt=st.sampled_from(sorted(FORMATS)),
       op=st.sampled_from(["flip", "truncate", "insert", "zero-tail", "zip-fields"]),
       where=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=4),
       junk=st.binary(min_size=1, max_size=8))
def test_corrupted_files_load_or_raise_one_data_error_naming_the_file(tmp_path: Path, fmt, op, where, junk) -> None:
    raw = bytearray(FORMATS[fmt][3])
    at = [int(w * len(raw)) for w in where]
    if op == "flip":
        for i, b in zip(at, junk * 4):
            raw[i] ^= b or 0xFF
    elif op == "truncate":
        raw = raw[: at[0]]
    elif op == "insert":
        raw[at[0]:at[0]] = junk
    elif op == "zip-fields":
        # The version/flags/method fields of the zip headers (an .npz is a zip): rare targets for
        # random flips, and zipfile answers them with RuntimeError/NotImplementedError.
        for signature in (b"PK\x03\x04", b"PK\x01\x02"):
            i = raw.find(signature)
            if i >= 0:
                raw[i + 4 + int(where[0] * 6)] ^= junk[0] or 0xFF
    else:
        raw[at[0]:] = bytes(len(raw) - at[0])
    cfg = _write(tmp_path, fmt, bytes(raw))
    try:
        x = load_images(cfg)
    except DataError as exc:
        text = str(exc)
        assert "\n" not in text and FORMATS[fmt][0] in text, text
    else:  # a flip in pixel data, a JPEG's robustness...: then the shape must still be right
        assert x.dtype.is_floating_point is False and x.shape[1:] == (3, cfg.image_size, cfg.image_size)


def _npz_claiming(shape: str) -> bytes:
    """An .npz whose .npy header states ``shape`` over the 768 bytes of ``_IMAGES``."""
    import zipfile

    header = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * ((64 - (10 + len(header) + 1) % 64) % 64) + b"\n"  # numpy's 64-byte alignment
    member = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + _IMAGES.tobytes()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("images.npy", member)
    return out.getvalue()


def test_npz_header_claiming_a_huge_array_is_a_data_error(tmp_path: Path) -> None:
    """numpy allocates what the header claims before reading: a lying header (a terabyte here)
    must end as a DataError, not a MemoryError."""
    assert load_images(_write(tmp_path, "npz", _npz_claiming("(4, 3, 8, 8)"))).shape == (4, 3, 8, 8)  # control
    _assert_data_error(_write(tmp_path, "npz", _npz_claiming("(4000000000000, 3, 8, 8)")), "images.npz")
    _assert_data_error(_write(tmp_path, "npz", _npz_claiming("(40, 3, 8, 8)")), "images.npz")  # short body


@pytest.mark.parametrize(
    ("fmt", "content", "needles"),
    [
        ("npz", _npz(images=np.zeros((0, 8, 8), np.uint8)), ["holds no images"]),
        ("npz", _npz(images=np.zeros((2, 8, 8, 4), np.uint8)), ["images.npz", "C in (1, 3)"]),  # RGBA
        ("npz", _npz(images=np.zeros((2, 8, 8), np.uint16)), ["images.npz", "uint16", "only uint8"]),
        ("npz", b"PK\x03\x04" + bytes(40), ["images.npz", "cannot read"]),
        ("npz", b"", ["images.npz"]),
        ("imagenet64", _npz(data=np.zeros((2, 100), np.uint8)), ["train_data_batch_1.npz", "3*S*S"]),
        ("imagenet64", _npz(images=np.zeros((2, 192), np.uint8)), ["train_data_batch_1.npz", "'data'"]),
        ("cifar10", _cifar_batch(np.zeros((2, 1024), np.uint8)), ["data_batch_1", "[N, 3072]"]),  # 1 channel
        ("cifar10", _cifar_batch(np.zeros((2, 3072), np.float32)), ["data_batch_1", "uint8"]),
        ("cifar10", _cifar_batch([[0] * 3072]), ["data_batch_1", "uint8 [N, 3072]"]),
        ("cifar10", b"\x80\x05not a pickle", ["data_batch_1", "cannot read"]),
        ("png", _image("PNG", np.zeros((8, 8, 3), np.uint8))[:40], ["a.png", "allowed"]),  # cut in the pixels
        ("png", _image("PNG", (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)),
         ["a.png", "I;16", "allowed: 8-bit"]),  # would be clipped to nearly all white
        ("png", b"GIF89a" + bytes(30), ["a.png", "allowed"]),
    ],
    ids=["npz-empty", "npz-4-channels", "npz-uint16", "npz-bad-zip", "npz-empty-file", "imagenet-rows",
         "imagenet-no-data-key", "cifar-1-channel", "cifar-float", "cifar-list", "cifar-not-pickle",
         "png-truncated", "png-16-bit", "png-garbage"],
)
def test_bad_files_name_the_file_and_what_is_allowed(tmp_path: Path, fmt, content, needles) -> None:
    _assert_data_error(_write(tmp_path, fmt, content), *needles)


def test_wrong_kind_of_path_is_named(tmp_path: Path) -> None:
    (tmp_path / "some_file.npz").write_bytes(FORMATS["npz"][3])
    (tmp_path / "some_folder").mkdir()
    _assert_data_error(DataConfig(source="folder", path=tmp_path / "some_file.npz", image_size=8),
                       "some_file.npz", "must be a folder")
    _assert_data_error(DataConfig(source="npz", path=tmp_path / "some_folder", image_size=8),
                       "some_folder", "must be a file")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    _assert_data_error(DataConfig(source="npz", path=tmp_path / "dangling", image_size=8), "dangling", "does not exist")


def test_folder_of_gray_and_color_images_is_converted_not_refused(tmp_path: Path) -> None:
    """Mixed channel counts are not an error: every image is converted to data.channels."""
    (tmp_path / "a.png").write_bytes(_image("PNG", np.full((8, 8), 200, np.uint8)))
    (tmp_path / "b.png").write_bytes(_image("PNG", np.zeros((8, 8, 4), np.uint8)))  # RGBA
    for channels in (1, 3):
        x = load_images(DataConfig(source="folder", path=tmp_path, image_size=8, channels=channels))
        assert tuple(x.shape) == (2, channels, 8, 8)
        assert int(x[0].min()) == 200  # gray stays 200 in every channel
