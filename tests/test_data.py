"""Specification of tdc_core.training.data: loading, value ranges, splitting, sampling, bad input."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tdc_core.config import DataConfig
from tdc_core.errors import DataError
from tdc_core.training.data import (
    BatchSampler,
    dataset_fingerprint,
    load_images,
    split_heldout,
    to_model_range,
    to_uint8,
)

# --- writers of tiny files in the real formats -------------------------------------------------


def _rng_images(n: int, c: int, s: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, s, s), dtype=np.uint8)


def _write_cifar_batch(path: Path, images: np.ndarray, *, protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
    batch = {
        b"batch_label": b"training batch",
        b"labels": list(range(len(images))),
        b"data": images.reshape(len(images), -1),  # [N, 3072], row-major CHW
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    with path.open("wb") as f:
        pickle.dump(batch, f, protocol=protocol)


@pytest.fixture
def cifar_dir(tmp_path: Path) -> tuple[Path, np.ndarray]:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = _rng_images(5, 3, 32)
    _write_cifar_batch(folder / "data_batch_1", images[:3])
    _write_cifar_batch(folder / "data_batch_2", images[3:])
    (folder / "test_batch").write_bytes(b"not read")  # only data_batch_* is training data
    return folder, images


def _write_imagenet_npz(path: Path, images: np.ndarray) -> None:
    np.savez(path, data=images.reshape(len(images), -1), labels=np.arange(1, len(images) + 1))


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _cfg(source: str, path: Path | None, *, size: int, channels: int = 3, **kw) -> DataConfig:
    return DataConfig(source=source, path=path, image_size=size, channels=channels, **kw)


def _assert_images(x: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert x.dtype == torch.uint8 and x.device.type == "cpu" and x.is_contiguous()
    assert tuple(x.shape) == shape


# --- sources -----------------------------------------------------------------------------------


def test_digits_are_1797_gray_8x8_images_spanning_0_to_255() -> None:
    x = load_images(DataConfig(source="digits", image_size=8, channels=1))
    _assert_images(x, (1797, 1, 8, 8))
    assert x.min() == 0 and x.max() == 255  # 0..16 scaled to 0..255


def test_digits_resize_to_16_and_repeat_gray_into_rgb() -> None:
    x = load_images(DataConfig(source="digits", image_size=16, channels=3, max_images=20))
    _assert_images(x, (20, 3, 16, 16))
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])


def test_max_images_keeps_the_first_n_in_source_order() -> None:
    full = load_images(DataConfig(source="digits"))
    first = load_images(DataConfig(source="digits", max_images=10))
    assert torch.equal(first, full[:10])


def test_cifar10_reads_all_data_batches_in_order_as_chw(cifar_dir) -> None:
    folder, images = cifar_dir
    x = load_images(_cfg("cifar10", folder, size=32))
    _assert_images(x, (5, 3, 32, 32))
    assert torch.equal(x, torch.from_numpy(images))


def test_cifar10_accepts_the_parent_folder_and_max_images(cifar_dir) -> None:
    folder, images = cifar_dir
    x = load_images(_cfg("cifar10", folder.parent, size=32, max_images=2))
    assert torch.equal(x, torch.from_numpy(images[:2]))


def test_cifar10_reads_legacy_pickles_that_name_numpy_core(tmp_path: Path) -> None:
    # The distributed files predate numpy 2 and reference numpy.core.multiarray._reconstruct.
    images = _rng_images(2, 3, 32)
    _write_cifar_batch(tmp_path / "data_batch_1", images, protocol=3)
    raw = (tmp_path / "data_batch_1").read_bytes()
    assert b"numpy._core.multiarray" in raw
    (tmp_path / "data_batch_1").write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert torch.equal(load_images(_cfg("cifar10", tmp_path, size=32)), torch.from_numpy(images))


def test_cifar10_to_gray_uses_itu_601_luma(tmp_path: Path) -> None:
    images = np.zeros((1, 3, 32, 32), dtype=np.uint8)
    images[0, 0] = 255  # pure red
    _write_cifar_batch(tmp_path / "data_batch_1", images)
    x = load_images(_cfg("cifar10", tmp_path, size=32, channels=1))
    _assert_images(x, (1, 1, 32, 32))
    assert (x == round(0.299 * 255)).all()


def test_imagenet64_reads_batch_files_in_numeric_order(tmp_path: Path) -> None:
    for i in (1, 2, 10):  # batch_10 must come after batch_2
        _write_imagenet_npz(tmp_path / f"train_data_batch_{i}.npz", np.full((1, 3, 8, 8), i, np.uint8))
    x = load_images(_cfg("imagenet64", tmp_path, size=8))
    _assert_images(x, (3, 3, 8, 8))
    assert x[:, 0, 0, 0].tolist() == [1, 2, 10]


def test_imagenet64_reads_a_single_file_as_chw_rows(tmp_path: Path) -> None:
    images = _rng_images(4, 3, 64)
    _write_imagenet_npz(tmp_path / "train_data_batch_1.npz", images)
    x = load_images(_cfg("imagenet64", tmp_path / "train_data_batch_1.npz", size=64))
    _assert_images(x, (4, 3, 64, 64))
    assert torch.equal(x, torch.from_numpy(images))


def test_folder_reads_png_and_jpeg_recursively_in_sorted_order(tmp_path: Path) -> None:
    a, b = _rng_images(2, 3, 8).transpose(0, 2, 3, 1)
    _write_png(tmp_path / "a.png", a)
    _write_png(tmp_path / "sub" / "b.PNG", b)
    Image.fromarray(a).save(tmp_path / "sub" / "c.JPG", format="JPEG")
    (tmp_path / "notes.txt").write_text("ignored")
    rgb = load_images(_cfg("folder", tmp_path, size=8, channels=3))
    _assert_images(rgb, (3, 3, 8, 8))
    assert torch.equal(rgb[0], torch.from_numpy(a).permute(2, 0, 1))
    assert torch.equal(rgb[1], torch.from_numpy(b).permute(2, 0, 1))
    _assert_images(load_images(_cfg("folder", tmp_path, size=8, channels=1)), (3, 1, 8, 8))


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NHW"])
def test_npz_layouts_all_become_nchw(tmp_path: Path, layout: str) -> None:
    channels = 1 if layout == "NHW" else 3
    nchw = _rng_images(4, channels, 8)
    stored = {"NHWC": nchw.transpose(0, 2, 3, 1), "NCHW": nchw, "NHW": nchw[:, 0]}[layout]
    np.savez(tmp_path / "x.npz", images=stored, labels=np.arange(4))
    x = load_images(_cfg("npz", tmp_path / "x.npz", size=8, channels=channels))
    _assert_images(x, (4, channels, 8, 8))
    assert torch.equal(x, torch.from_numpy(nchw))


def test_npz_single_unnamed_array_is_used(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", _rng_images(3, 1, 8))
    _assert_images(load_images(_cfg("npz", tmp_path / "x.npz", size=8, channels=1)), (3, 1, 8, 8))


# --- value ranges ------------------------------------------------------------------------------


def test_to_model_range_maps_0_255_to_minus1_1_and_to_uint8_inverts_it() -> None:
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    y = to_model_range(pixels)
    assert y.dtype == torch.float32 and y.min() == -1.0 and y.max() == 1.0
    assert torch.equal(to_uint8(y), pixels)


def test_to_uint8_clamps_out_of_range_values() -> None:
    assert to_uint8(torch.tensor([-3.0, 0.0, 7.0])).tolist() == [0, 128, 255]


# --- held-out split ----------------------------------------------------------------------------


def _numbered(n: int) -> torch.Tensor:
    """Images whose first pixel is their index (n <= 256)."""
    x = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return x


def _ids(x: torch.Tensor) -> list[int]:
    return x[:, 0, 0, 0].tolist()


def test_split_is_deterministic_disjoint_and_complete() -> None:
    images = _numbered(100)
    train, held = split_heldout(images, fraction=0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert sorted(_ids(train) + _ids(held)) == list(range(100))
    again_train, again_held = split_heldout(images, fraction=0.1, seed=3)
    assert torch.equal(train, again_train) and torch.equal(held, again_held)
    assert _ids(split_heldout(images, fraction=0.1, seed=4)[1]) != _ids(held)


def test_split_keeps_both_parts_non_empty() -> None:
    train, held = split_heldout(_numbered(2), fraction=0.01, seed=0)
    assert len(train) == 1 and len(held) == 1
    train, held = split_heldout(_numbered(3), fraction=0.99, seed=0)
    assert len(train) == 1 and len(held) == 2


def test_split_of_one_image_is_a_data_error() -> None:
    with pytest.raises(DataError, match="at least 2"):
        split_heldout(_numbered(1), fraction=0.5, seed=0)


# --- batch sampler -----------------------------------------------------------------------------


def test_sampler_batches_are_float_in_model_range_and_always_full() -> None:
    sampler = BatchSampler(_numbered(5), batch_size=8, seed=0)  # N < batch_size
    for _ in range(3):
        batch = sampler.next_batch()
        assert batch.dtype == torch.float32 and tuple(batch.shape) == (8, 1, 4, 4)
        assert batch.min() >= -1.0 and batch.max() <= 1.0


def test_sampler_visits_every_image_once_per_epoch() -> None:
    sampler = BatchSampler(_numbered(6), batch_size=3, seed=1)
    for _ in range(3):
        epoch = torch.cat([sampler.next_batch(), sampler.next_batch()])
        assert sorted(_ids(to_uint8(epoch))) == list(range(6))


def test_sampler_resumes_exactly_across_epoch_boundaries(tmp_path: Path) -> None:
    images = torch.from_numpy(_rng_images(5, 1, 4))
    make = lambda: BatchSampler(images, batch_size=3, seed=7, random_flip=True)  # noqa: E731
    a, b = make(), make()
    k, m = 3, 4  # 3 * 3 = 9 images: mid-way through the second epoch
    expected = [a.next_batch() for _ in range(k + m)]
    for _ in range(k):
        b.next_batch()
    torch.save(b.state_dict(), tmp_path / "sampler.pt")
    state = torch.load(tmp_path / "sampler.pt", weights_only=True)
    c = make()
    c.load_state_dict(state)
    assert c.epoch == b.epoch == 1
    for want in expected[k:]:
        assert torch.equal(c.next_batch(), want)


def test_sampler_state_for_other_dataset_is_refused() -> None:
    state = BatchSampler(_numbered(5), batch_size=2, seed=0).state_dict()
    with pytest.raises(DataError, match="5 images"):
        BatchSampler(_numbered(6), batch_size=2, seed=0).load_state_dict(state)


def test_random_flip_mirrors_some_images_and_only_horizontally() -> None:
    images = torch.from_numpy(_rng_images(4, 1, 4))
    batch = to_uint8(BatchSampler(images, batch_size=64, seed=0, random_flip=True).next_batch())
    originals = {bytes(x.numpy()) for x in images}
    mirrored = {bytes(x.flip(-1).numpy()) for x in images}
    kinds = [bytes(x.numpy()) in originals for x in batch]
    assert all(bytes(x.numpy()) in originals | mirrored for x in batch)
    assert 0 < sum(kinds) < len(kinds)
    plain = to_uint8(BatchSampler(images, batch_size=64, seed=0).next_batch())
    assert all(bytes(x.numpy()) in originals for x in plain)


# --- fingerprint -------------------------------------------------------------------------------


def test_fingerprint_is_short_stable_and_sensitive_to_pixels_and_config() -> None:
    cfg = DataConfig(source="digits")
    images = _numbered(10)
    fp = dataset_fingerprint(cfg, images)
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert dataset_fingerprint(cfg, images.clone()) == fp
    changed = images.clone()
    changed[3, 0, 2, 2] += 1
    assert dataset_fingerprint(cfg, changed) != fp
    assert dataset_fingerprint(DataConfig(source="digits", channels=3), images) != fp


# --- bad input: one DataError naming the file --------------------------------------------------


@pytest.mark.parametrize("source", ["cifar10", "imagenet64", "folder", "npz"])
def test_missing_path_names_it(tmp_path: Path, source: str) -> None:
    missing = tmp_path / "nowhere_to_be_found"
    with pytest.raises(DataError, match="nowhere_to_be_found.*does not exist"):
        load_images(_cfg(source, missing, size=32))


def test_empty_folder_names_it(tmp_path: Path) -> None:
    (tmp_path / "empty_images").mkdir()
    with pytest.raises(DataError, match="empty_images"):
        load_images(_cfg("folder", tmp_path / "empty_images", size=8))


def test_cifar_folder_without_batches_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"data_batch_.*{re.escape(tmp_path.name)}"):
        load_images(_cfg("cifar10", tmp_path, size=32))


def test_cifar_wrong_image_size_is_refused(cifar_dir) -> None:
    folder, _ = cifar_dir
    with pytest.raises(DataError, match="cifar-10-batches-py.*32x32.*image_size=16"):
        load_images(_cfg("cifar10", folder, size=16))


def test_truncated_cifar_pickle_names_the_file(cifar_dir) -> None:
    folder, _ = cifar_dir
    raw = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="data_batch_2"):
        load_images(_cfg("cifar10", folder, size=32))


def test_cifar_batch_without_data_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataError, match="data_batch_1 must be a dict with key b'data'; got a list"):
        load_images(_cfg("cifar10", tmp_path, size=32))


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _OpensFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", [_RunsShell, _OpensFile])
def test_malicious_cifar_pickle_is_refused_without_running_it(tmp_path: Path, payload) -> None:
    marker = tmp_path / "pwned"
    batch = tmp_path / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": payload(marker), b"labels": [0]}))
    with pytest.raises(DataError, match="data_batch_1"):
        load_images(_cfg("cifar10", tmp_path, size=32))
    assert not marker.exists()
    # Control: the payload is live, so the assertion above is meaningful.
    pickle.loads(batch.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("source", ["npz", "imagenet64"])
def test_truncated_npz_names_the_file(tmp_path: Path, source: str) -> None:
    good = tmp_path / "good.npz"
    _write_imagenet_npz(good, _rng_images(4, 3, 8))
    raw = good.read_bytes()
    cut = tmp_path / "train_data_batch_1.npz"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="train_data_batch_1.npz"):
        load_images(_cfg(source, cut, size=8))


def test_corrupt_png_names_the_file(tmp_path: Path) -> None:
    _write_png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "broken.png").write_bytes(os.urandom(200))
    with pytest.raises(DataError, match="broken.png"):
        load_images(_cfg("folder", tmp_path, size=8, channels=1))


def test_mixed_image_sizes_name_the_first_odd_file(tmp_path: Path) -> None:
    _write_png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    _write_png(tmp_path / "b_odd.png", np.zeros((9, 8), np.uint8))
    _write_png(tmp_path / "c_odd.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match=r"b_odd.png is 8x9.*8x8"):
        load_images(_cfg("folder", tmp_path, size=8, channels=1))


def test_folder_images_of_the_wrong_size_are_refused(tmp_path: Path) -> None:
    _write_png(tmp_path / "small.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"small.png is 8x8.*32x32"):
        load_images(_cfg("folder", tmp_path, size=32))


def test_imagenet_rows_of_the_wrong_size_are_refused(tmp_path: Path) -> None:
    _write_imagenet_npz(tmp_path / "train_data_batch_1.npz", _rng_images(2, 3, 8))
    with pytest.raises(DataError, match=r"train_data_batch_1.npz holds 8x8.*image_size=16"):
        load_images(_cfg("imagenet64", tmp_path, size=16))


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.zeros((2, 8, 8, 2), np.uint8), r"\(2, 8, 8, 2\).*C in \(1, 3\)"),  # 2 channels
        (np.zeros((2, 3, 8, 8), np.float32), r"float32.*only uint8"),
        (np.zeros((2, 64), np.uint8), r"\(2, 64\).*allowed"),  # flat rows
        (np.zeros((2, 3, 16, 16), np.uint8), r"16x16.*image_size=8"),
        (np.array([None, 1], dtype=object), r"object.*only plain uint8"),  # needs unpickling
    ],
    ids=["channels", "dtype", "ndim", "size", "object"],
)
def test_bad_npz_arrays_name_file_shape_and_what_is_allowed(tmp_path: Path, array, expected) -> None:
    np.savez(tmp_path / "bad_images.npz", images=array)
    with pytest.raises(DataError, match=f"bad_images.npz.*{expected}"):
        load_images(_cfg("npz", tmp_path / "bad_images.npz", size=8))


def test_npz_with_several_unknown_keys_lists_them(tmp_path: Path) -> None:
    np.savez(tmp_path / "ambiguous.npz", a=np.zeros((2, 8, 8), np.uint8), b=np.zeros(2))
    with pytest.raises(DataError, match=r"ambiguous.npz has arrays \['a', 'b'\]"):
        load_images(_cfg("npz", tmp_path / "ambiguous.npz", size=8))
