"""Feature extractors for FID/KID: clean-fid's Inception, and an offline digits classifier.

Every extractor maps uint8 images ``[N x C x H x W]`` (C in 1, 3) to float64 features
``[N x D]`` and carries three strings that go into every score computed with it:

* ``identity`` — what exactly produced the features (network, weights hash, preprocessing);
  part of the reference-statistics cache key, so new weights never reuse old statistics.
* ``mode`` — clean-fid's mode (``clean``, ``legacy_pytorch``, ``legacy_tensorflow``: how
  images are resized to 299 px; numbers from different modes are not comparable), or
  ``digits-native`` for the digits CNN, which reads 8x8 grayscale and uses no clean-fid resizer.
* ``label`` — whether the score is comparable with published Inception FIDs.

**Inception** (:class:`InceptionExtractor`) is clean-fid's own network and resizer, used
unchanged; only the weights file is located by this project, because clean-fid always
downloads to a fixed temp-folder path with no checksum and fails offline with a raw
``URLError``. :func:`locate_inception_weights` documents the search order; when nothing is
found it raises :class:`~tdc_core.errors.ConfigError` that says where to put the file.

**Digits CNN** (:class:`DigitsExtractor`) is a small classifier trained by this project on
scikit-learn's digits (seconds on a CPU, deterministic) and cached under the cache folder,
keyed by a hash of its training recipe. Its 64-d penultimate activations (pre-ReLU, unit
RMS) stand in for Inception's 2048-d pool features: scores are only comparable with other digits-CNN scores.
It never trains on the FID reference: for digits data it learns from every digit outside the
split that ``eval.reference`` makes the reference (:func:`digits_cnn_split`), its accuracy is
measured on the reference, and its identity says so (e.g. for the digits preset: trained on the
180 held-out digits, measured on the 1617-digit training split that is the reference).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import pickle
import threading
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tdc_core.atomic import atomic_write_bytes
from tdc_core.config import DataConfig, EvalConfig
from tdc_core.errors import CheckpointError, ConfigError, first_line
from tdc_core.evaluation.reference import ReferenceSplit, choose_reference
from tdc_core.hashing import file_sha256
from tdc_core.training.checkpoint import load_checkpoint, save_checkpoint
from tdc_core.training.data import split_heldout

__all__ = [
    "DIGITS_COUNT",
    "DIGITS_LABEL",
    "INCEPTION_ENV_VAR",
    "DigitsCNN",
    "DigitsExtractor",
    "DigitsRecipe",
    "FeatureExtractor",
    "FidMode",
    "InceptionExtractor",
    "build_extractor",
    "digits_cnn_split",
    "digits_reference_split",
    "inception_weights_name",
    "load_digits_extractor",
    "locate_inception_weights",
    "resolve_cache_dir",
]

FidMode = Literal["clean", "legacy_pytorch", "legacy_tensorflow"]

INCEPTION_ENV_VAR = "TDC_INCEPTION_WEIGHTS"
DIGITS_LABEL = "digits-cnn features (not comparable with Inception FID)"
DIGITS_MODE = "digits-native"  # 8x8 grayscale input; no clean-fid resizer involved
DIGITS_COUNT = 1797  # scikit-learn's digits (no two are identical)

# clean-fid's file names: the TorchScript network (modes clean and legacy_tensorflow) and
# pytorch-fid's state dict (mode legacy_pytorch). The names are what clean-fid looks for.
_TORCHSCRIPT_NAME = "inception-2015-12-05.pt"
_PYTORCH_FID_NAME = "pt_inception-2015-12-05-6726825d.pth"


def resolve_cache_dir(cache_dir: Path | None) -> Path:
    """``eval.cache_dir``, or ``~/.cache/tdc`` when it is None (never inside site-packages)."""
    return Path(cache_dir).expanduser() if cache_dir is not None else Path.home() / ".cache" / "tdc"


class FeatureExtractor(ABC):
    """uint8 images ``[N x C x H x W]`` → float64 features ``[N x D]`` (no gradients)."""

    kind: str      # "inception" or "digits"
    identity: str  # network + weights hash + preprocessing; a cache-key component
    mode: str      # clean-fid mode, or "digits-native"
    label: str     # comparability label carried by every score
    dim: int       # D

    @abstractmethod
    def features(self, images: torch.Tensor, *, batch_size: int = 250) -> np.ndarray:
        """Features ``[N x D]`` float64 of uint8 images ``[N x C x H x W]``, in batches."""

    def describe(self) -> dict[str, str]:
        """The fields every result record carries."""
        return {"feature_extractor": self.identity, "fid_mode": self.mode, "comparability": self.label}


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or (
        images.shape[1] not in (1, 3)
    ):
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"feature extraction expects uint8 images [N, C, H, W] with C in (1, 3), got {got}")
    if images.shape[0] == 0:
        raise ValueError("feature extraction got no images")


# --- Inception (clean-fid) ---------------------------------------------------------------------


def inception_weights_name(mode: str) -> str:
    """The file clean-fid loads in ``mode``: the TorchScript network, or pytorch-fid's weights."""
    if mode not in ("clean", "legacy_pytorch", "legacy_tensorflow"):
        raise ConfigError(f"eval.fid_mode={mode!r} is not a clean-fid mode; allowed: clean, legacy_pytorch, "
                          f"legacy_tensorflow")
    return _PYTORCH_FID_NAME if mode == "legacy_pytorch" else _TORCHSCRIPT_NAME


def _inception_url(mode: str) -> str:
    # clean-fid's own URLs, read from the installed package so they stay in step with it.
    if mode == "legacy_pytorch":
        from cleanfid.inception_pytorch import FID_WEIGHTS_URL

        return FID_WEIGHTS_URL
    from cleanfid.downloads_helper import inception_url

    return inception_url


def _cleanfid_default_path(mode: str) -> Path:
    """Where clean-fid itself keeps the file: ``/tmp`` (its fixed folder, not ``$TMPDIR``) for
    the TorchScript network, torch hub's checkpoint folder for pytorch-fid's weights."""
    name = inception_weights_name(mode)
    if mode == "legacy_pytorch":
        return Path(torch.hub.get_dir()) / "checkpoints" / name
    return Path("./" if os.name == "nt" else "/tmp") / name


def _download(url: str, dest: Path, *, timeout_s: float) -> None:
    """Fetch ``url`` into ``dest`` atomically (a partial download never appears at ``dest``)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - fixed https URL
        atomic_write_bytes(dest, response.read())


def _missing_weights_error(mode: str, cache_dir: Path, reason: str) -> ConfigError:
    name = inception_weights_name(mode)
    return ConfigError(
        f"Inception weights for clean-fid mode {mode!r} were not found and could not be downloaded "
        f"({reason}). Download {name} from {_inception_url(mode)} on a machine with network access, then "
        f"either put it at {cache_dir / 'inception' / name}, or set eval.inception_weights=/path/to/{name}, "
        f"or set the environment variable {INCEPTION_ENV_VAR}=/path/to/{name}. "
        f"Offline CPU runs on digits can use eval.feature_extractor=digits instead (scores are then not "
        f"comparable with Inception FID)."
    )


def locate_inception_weights(
    *,
    mode: str,
    configured: Path | None,
    cache_dir: Path,
    environ: Mapping[str, str] | None = None,
    allow_download: bool = True,
    timeout_s: float = 30.0,
) -> Path:
    """Path of the Inception weights file clean-fid needs in ``mode``.

    Search order (first hit wins):

    1. ``configured`` (``eval.inception_weights``): must exist if given.
    2. ``$TDC_INCEPTION_WEIGHTS``: must exist if set.
    3. ``<cache_dir>/inception/<name>`` — where this function's own downloads go.
    4. clean-fid's default location (``/tmp/inception-2015-12-05.pt``; torch hub's checkpoint
       folder for ``legacy_pytorch``), e.g. from an earlier clean-fid run.
    5. A download from clean-fid's URL into ``<cache_dir>/inception/<name>`` (atomic, so an
       interrupted download never leaves a corrupt file), unless ``allow_download`` is False.

    ``<name>`` is ``inception-2015-12-05.pt`` (TorchScript; modes ``clean`` and
    ``legacy_tensorflow``) or ``pt_inception-2015-12-05-6726825d.pth`` (``legacy_pytorch``).

    Args:
        environ: where to read the environment variable (default ``os.environ``).
        timeout_s: socket timeout of the download (offline, name resolution fails at once;
            a silently dropped connection costs at most this long).

    Raises:
        ConfigError: a configured file does not exist, or no file was found and the download
            was disabled or failed; the message says where to put the file and which config
            field or environment variable to set.
    """
    name = inception_weights_name(mode)
    environ = os.environ if environ is None else environ
    if configured is not None:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise ConfigError(f"eval.inception_weights={configured} does not exist; it must be clean-fid's {name}")
        return path
    from_env = environ.get(INCEPTION_ENV_VAR)
    if from_env:
        path = Path(from_env).expanduser()
        if not path.is_file():
            raise ConfigError(f"environment variable {INCEPTION_ENV_VAR}={from_env} names no file; it must be "
                              f"clean-fid's {name}")
        return path
    ours = cache_dir / "inception" / name
    for candidate in (ours, _cleanfid_default_path(mode)):
        if candidate.is_file():
            return candidate
    if not allow_download:
        raise _missing_weights_error(mode, cache_dir, "downloads are disabled")
    try:
        _download(_inception_url(mode), ours, timeout_s=timeout_s)
    except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError, HTTPError, timeouts
        reason = getattr(exc, "reason", None) or first_line(exc)
        raise _missing_weights_error(mode, cache_dir, f"download failed: {reason}") from None
    return ours


# clean-fid's legacy_pytorch network fetches its state dict through a module-level
# `load_state_dict_from_url`; it is swapped for a local load while the network is built, under
# this lock, so concurrent builds never see each other's file.
_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _local_state_dict(path: Path) -> Iterator[None]:
    import cleanfid.inception_pytorch as ip

    with _PATCH_LOCK:
        original = ip.load_state_dict_from_url
        ip.load_state_dict_from_url = lambda *_a, **_k: torch.load(path, map_location="cpu", weights_only=True)
        try:
            yield
        finally:
            ip.load_state_dict_from_url = original


def _canonical_folder(path: Path, *, cache_dir: Path, sha: str) -> Path:
    """A folder holding ``path`` under the file name clean-fid's ``InceptionV3W`` loads
    (``<folder>/inception-2015-12-05.pt``): the file's own folder when the name already
    matches, else a folder of ours with a symlink (a copy where symlinks are not allowed)."""
    if path.name == _TORCHSCRIPT_NAME:
        return path.parent
    folder = cache_dir / "inception" / "by-sha256" / sha[:16]
    link = folder / _TORCHSCRIPT_NAME
    if not link.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        try:
            link.unlink(missing_ok=True)
            link.symlink_to(path.resolve())
        except OSError:
            atomic_write_bytes(link, path.read_bytes())
    return folder


class InceptionExtractor(FeatureExtractor):
    """clean-fid's Inception-V3 pool features (2048-d) with clean-fid's resizing for ``mode``.

    Per image, exactly as ``cleanfid.fid.get_model_features``: uint8 HWC (grayscale repeated
    to RGB) → ``cleanfid.resize.build_resizer(mode)`` → the network (values in [0, 255]) via
    ``cleanfid.fid.get_batch_features``. Built by :meth:`load`.
    """

    kind = "inception"
    dim = 2048

    def __init__(self, *, model_fn: Callable[[torch.Tensor], torch.Tensor], mode: str, weights: Path,
                 weights_sha256: str, device: torch.device) -> None:
        from cleanfid.resize import build_resizer

        self._model_fn = model_fn
        self._resize = build_resizer(mode)
        self.mode = mode
        self.weights = weights
        self.device = device
        self.identity = f"inception-v3/{inception_weights_name(mode)}/sha256:{weights_sha256[:16]}/{mode}"
        self.label = (f"Inception-V3 features, clean-fid mode {mode!r} (comparable with clean-fid "
                      f"FIDs in the same mode and sample count)")

    @classmethod
    def load(
        cls,
        *,
        mode: str = "clean",
        weights: Path | None = None,
        cache_dir: Path,
        device: torch.device | str = "cpu",
        environ: Mapping[str, str] | None = None,
        allow_download: bool = True,
    ) -> InceptionExtractor:
        """Locate the weights (:func:`locate_inception_weights`) and build clean-fid's network.

        Raises:
            ConfigError: no weights file (see :func:`locate_inception_weights`), or the file is
                not the network clean-fid expects in ``mode`` (corrupt, truncated, wrong file).
        """
        device = torch.device(device)
        path = locate_inception_weights(mode=mode, configured=weights, cache_dir=cache_dir, environ=environ,
                                        allow_download=allow_download)
        sha = file_sha256(path)
        try:
            if mode == "legacy_pytorch":
                from cleanfid.inception_pytorch import InceptionV3

                with _local_state_dict(path):
                    net = InceptionV3(output_blocks=[3], resize_input=False)
                net = net.to(device).eval()

                def model_fn(x: torch.Tensor) -> torch.Tensor:  # as cleanfid.features.feature_extractor
                    return net(x / 255)[0].squeeze(-1).squeeze(-1)
            else:
                from cleanfid.inception_torchscript import InceptionV3W

                folder = _canonical_folder(path, cache_dir=cache_dir, sha=sha)
                net = InceptionV3W(str(folder), download=False,
                                   resize_inside=mode == "legacy_tensorflow").to(device).eval()
                model_fn = net
        except (RuntimeError, ValueError, OSError, AttributeError, KeyError, EOFError, pickle.UnpicklingError) as exc:
            raise ConfigError(
                f"Inception weights {path} cannot be loaded for clean-fid mode {mode!r} ({first_line(exc)}); "
                f"it must be clean-fid's {inception_weights_name(mode)} (a corrupt file from an "
                f"interrupted download must be deleted)"
            ) from None
        return cls(model_fn=model_fn, mode=mode, weights=path, weights_sha256=sha, device=device)

    def _resized(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B x C x H x W]`` → float32 ``[B x 3 x H' x W']`` in [0, 255] for the network."""
        rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        hwc = rgb.permute(0, 2, 3, 1).contiguous().numpy()
        if self.mode == "legacy_tensorflow":  # the network resizes inside
            return torch.from_numpy(hwc.transpose(0, 3, 1, 2).astype(np.float32))
        return torch.stack([torch.from_numpy(np.ascontiguousarray(self._resize(img).transpose(2, 0, 1)))
                            for img in hwc]).to(torch.float32)

    def features(self, images: torch.Tensor, *, batch_size: int = 250) -> np.ndarray:
        from cleanfid.fid import get_batch_features

        _check_images(images)
        images = images.cpu()
        out = [get_batch_features(self._resized(images[s:s + batch_size]), self._model_fn, self.device)
               for s in range(0, images.shape[0], batch_size)]
        return np.concatenate(out).astype(np.float64)


# --- the offline digits classifier ------------------------------------------------------------


@dataclass(frozen=True)
class DigitsRecipe:
    """Everything that determines the digits CNN, which digits it may learn from included; its
    hash keys the cached weights (:meth:`for_data` builds the one a config needs).

    With digits data (``reference_split`` set) the FID reference is one side of the pipeline's
    split of the first ``split_images`` digits (:func:`tdc_core.training.data.split_heldout` with
    ``split_fraction`` and ``split_seed``: ``data.max_images``, ``data.heldout_fraction``,
    ``data.split_seed``); the CNN trains on every other digit and its accuracy is measured on
    the reference. With other data (``reference_split=None``) the reference holds none of
    sklearn's digits: the CNN trains on ``1 - accuracy_fraction`` of them, measured on the rest.
    The defaults are the digits preset's: reference = the 1617-digit training split.
    """

    version: int = 2               # bump when the architecture or the code below changes
    reference_split: ReferenceSplit | None = "train"  # the FID reference's side of the split; None: not digits
    split_images: int = DIGITS_COUNT  # digits the pipeline splits (the first N: data.max_images)
    split_fraction: float = 0.1    # data.heldout_fraction
    split_seed: int = 0            # data.split_seed
    accuracy_fraction: float = 0.2  # reference_split=None only: digits kept out to measure accuracy
    seed: int = 0
    steps: int = 600               # AdamW steps (~4 s on one CPU core)
    batch_size: int = 64
    lr: float = 2e-3               # AdamW, cosine-decayed to 0
    weight_decay: float = 1e-4
    max_shift_px: int = 1          # random translation (zero padded): features that tolerate jitter
    widths: tuple[int, int, int] = (16, 32, 64)  # conv channels at 8, 8 and 4 px
    feature_dim: int = 64          # D of the penultimate layer

    def __post_init__(self) -> None:
        if not 2 <= self.split_images <= DIGITS_COUNT:
            raise ValueError(f"split_images must be in [2, {DIGITS_COUNT}], got {self.split_images}")

    @classmethod
    def for_data(cls, data: DataConfig, *, reference_split: ReferenceSplit, **fields: object) -> DigitsRecipe:
        """The recipe for ``data`` whose FID reference is its ``reference_split`` split (ignored
        unless ``data.source`` is digits); ``fields`` override the training settings."""
        if data.source != "digits":
            return cls(reference_split=None, **fields)
        n = min(DIGITS_COUNT, data.max_images or DIGITS_COUNT)
        return cls(reference_split=reference_split, split_images=n, split_fraction=data.heldout_fraction,
                   split_seed=data.split_seed, **fields)

    def key(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:12]


def digits_cnn_split(recipe: DigitsRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, measured)``: sorted indices into sklearn's digits that the CNN trains on and
    that its accuracy is measured on. With ``recipe.reference_split`` set, ``measured`` is the
    FID reference (the same digits the pipeline's :func:`~tdc_core.training.data.split_heldout`
    puts on that side) and ``train`` is every other digit, the split's other side and the
    digits past ``split_images`` alike: the two never share a digit."""
    if recipe.reference_split is None:
        perm = torch.randperm(DIGITS_COUNT, generator=torch.Generator().manual_seed(recipe.seed))
        n_held = round(DIGITS_COUNT * recipe.accuracy_fraction)
        return perm[n_held:].sort().values, perm[:n_held].sort().values
    train, heldout = split_heldout(torch.arange(recipe.split_images), fraction=recipe.split_fraction,
                                   seed=recipe.split_seed)
    reference = train if recipe.reference_split == "train" else heldout
    outside = torch.ones(DIGITS_COUNT, dtype=torch.bool)
    outside[reference] = False
    return outside.nonzero().squeeze(1), reference


def _training_set(recipe: DigitsRecipe, accuracy: float) -> str:
    """What the CNN learned from and where its accuracy was measured, for its identity."""
    train, measured = digits_cnn_split(recipe)
    if recipe.reference_split is None:
        return (f"trained on {train.numel()} of sklearn's {DIGITS_COUNT} digits, none of them in the FID reference "
                f"(not sklearn's digits); {accuracy:.1%} accurate on the other {measured.numel()}")
    side = "training" if recipe.reference_split == "train" else "held-out"
    return (f"trained on {train.numel()} digits disjoint from the FID reference, the {measured.numel()}-digit "
            f"{side} split (first {recipe.split_images} digits, data.heldout_fraction={recipe.split_fraction:g}, "
            f"data.split_seed={recipe.split_seed}); {accuracy:.1%} accurate on the reference")


class DigitsCNN(nn.Module):
    """8x8 grayscale in [-1, 1] ``[N x 1 x 8 x 8]`` → 10 logits.

    :meth:`embed` gives the ``feature_dim`` penultimate activations before their ReLU (after
    it, a third of the units are dead, which makes the feature covariance singular), times a
    fixed ``feature_scale`` set after training so the reference features have unit RMS: KID's
    cubic kernel ``(x·y/D + 1)³`` assumes features of order one, as Inception's are.
    """

    def __init__(self, *, widths: tuple[int, int, int] = (16, 32, 64), feature_dim: int = 64) -> None:
        super().__init__()
        a, b, c = widths
        self.body = nn.Sequential(
            nn.Conv2d(1, a, 3, padding=1), nn.ReLU(),
            nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 4x4
            nn.Conv2d(b, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 2x2
            nn.Flatten(), nn.Linear(4 * c, feature_dim),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, 10))
        self.register_buffer("feature_scale", torch.ones(()))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _digits_with_labels() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's digits as uint8 ``[1797 x 1 x 8 x 8]`` (quantised like ``tdc_core.training.data``) + labels."""
    from sklearn.datasets import load_digits  # slow import; only training needs it

    bunch = load_digits()
    pixels = np.rint(bunch.images * 255.0 / 16.0).astype(np.uint8)[:, None]
    return torch.from_numpy(pixels), torch.from_numpy(bunch.target.astype(np.int64))


def _to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N x C x H x W]`` → float ``[N x 1 x 8 x 8]`` in [-1, 1]: ITU-R 601 luma for RGB,
    antialiased bilinear resize to 8 px (the inverse of how ``tdc_core.training.data`` enlarges digits)."""
    x = images.to(torch.float32)
    if x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if x.shape[-2:] != (8, 8):
        x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    return x / 127.5 - 1.0


def _shift(x: torch.Tensor, max_px: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_px`` pixels (zero = black background fills in)."""
    if max_px == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_px,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_px + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(n, h, w)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


def train_digits_cnn(recipe: DigitsRecipe) -> tuple[DigitsCNN, float]:
    """Train the classifier on CPU, deterministically, on the digits :func:`digits_cnn_split`
    allows (never the FID reference); returns (model, accuracy on the measured digits: the
    reference, for digits data). ``feature_scale`` comes from the training digits too."""
    images, labels = _digits_with_labels()
    train, measured = digits_cnn_split(recipe)
    x_all = _to_input(images)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(recipe.seed)
        model = DigitsCNN(widths=recipe.widths, feature_dim=recipe.feature_dim)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * s / recipe.steps)))
    model.train()
    step = 0
    while step < recipe.steps:  # epochs over the training digits, the last one cut at `steps`
        order = train[torch.randperm(train.numel(), generator=gen)]
        for s in range(0, order.numel(), recipe.batch_size):
            if step == recipe.steps:
                break
            idx = order[s:s + recipe.batch_size]
            loss = F.cross_entropy(model(_shift(x_all[idx], recipe.max_shift_px, gen)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    model.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = float((model(x_all[measured]).argmax(1) == labels[measured]).float().mean())
        model.feature_scale.fill_(1.0 / model.body(x_all[train]).pow(2).mean().sqrt())
    return model, accuracy


def _state_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class DigitsExtractor(FeatureExtractor):
    """Penultimate features of the project's digits CNN. Built by :func:`load_digits_extractor`."""

    kind = "digits"
    mode = DIGITS_MODE
    label = DIGITS_LABEL

    def __init__(self, *, model: DigitsCNN, recipe: DigitsRecipe, accuracy: float, path: Path,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.recipe = recipe
        self.accuracy = accuracy  # on the digits it did not train on: the FID reference, for digits data
        self.path = path
        self.dim = recipe.feature_dim
        self.training_set = _training_set(recipe, accuracy)
        # The training set is part of the identity, so describe() (every record) states it.
        self.identity = (f"digits-cnn-v{recipe.version}/recipe:{recipe.key()}/sha256:{_state_sha256(model)[:16]} "
                         f"({self.training_set})")

    def check_reference(self, data: DataConfig, split: ReferenceSplit) -> None:
        """Raise unless this CNN was kept off the reference ``split`` of ``data``.

        Raises:
            ConfigError: digits data whose reference is not what the CNN was trained around
                (e.g. it was built for another config's split or eval.reference).
        """
        if data.source != "digits":
            return
        wanted = DigitsRecipe.for_data(data, reference_split=split)
        fields = ("reference_split", "split_images", "split_fraction", "split_seed")
        if any(getattr(wanted, f) != getattr(self.recipe, f) for f in fields):
            raise ConfigError(
                f"the digits CNN {self.identity} was trained around another FID reference than this config's "
                f"{split} split ({', '.join(f'{f}={getattr(wanted, f)}' for f in fields)}), so it may have "
                f"trained on reference images; build it from this config (build_extractor(config.eval, "
                f"config.data))"
            )

    @torch.no_grad()
    def features(self, images: torch.Tensor, *, batch_size: int = 250) -> np.ndarray:
        _check_images(images)
        out = [self.model.embed(_to_input(images[s:s + batch_size].cpu()).to(self.device)).cpu()
               for s in range(0, images.shape[0], batch_size)]
        return torch.cat(out).to(torch.float64).numpy()


def load_digits_extractor(
    *, cache_dir: Path, recipe: DigitsRecipe, device: torch.device | str = "cpu",
) -> DigitsExtractor:
    """The digits CNN from ``<cache_dir>/extractors/digits-cnn-<recipe key>.pt``, trained and
    saved there (atomically) first when missing or unreadable."""
    path = Path(cache_dir) / "extractors" / f"digits-cnn-{recipe.key()}.pt"
    if path.is_file():
        try:
            payload = load_checkpoint(path)
            if payload.get("kind") != "digits-cnn" or payload.get("recipe") != json.loads(json.dumps(asdict(recipe))):
                raise CheckpointError("recipe mismatch")
            model = DigitsCNN(widths=recipe.widths, feature_dim=recipe.feature_dim)
            model.load_state_dict(payload["model"])
            return DigitsExtractor(model=model, recipe=recipe, accuracy=float(payload["accuracy"]), path=path,
                                   device=device)
        except (CheckpointError, RuntimeError, KeyError):
            pass  # a damaged cache entry is retrained and overwritten below
    model, accuracy = train_digits_cnn(recipe)
    save_checkpoint(path, {"kind": "digits-cnn", "recipe": json.loads(json.dumps(asdict(recipe))),
                           "model": model.state_dict(), "accuracy": accuracy})
    return DigitsExtractor(model=model, recipe=recipe, accuracy=accuracy, path=path, device=device)


# --- choosing one from the config -------------------------------------------------------------


def digits_reference_split(eval_cfg: EvalConfig, data_cfg: DataConfig) -> ReferenceSplit:
    """The split ``eval.reference`` makes the FID reference of digits data, from the split's
    sizes alone (no images loaded): what ``reference_for_config`` finds once it loads them."""
    n = min(DIGITS_COUNT, data_cfg.max_images or DIGITS_COUNT)
    train, heldout = split_heldout(torch.arange(n), fraction=data_cfg.heldout_fraction, seed=data_cfg.split_seed)
    return choose_reference(eval_cfg.reference, num_heldout=heldout.numel(), num_train=train.numel(),
                            num_samples=eval_cfg.num_samples)


def build_extractor(
    eval_cfg: EvalConfig,
    data_cfg: DataConfig,
    *,
    device: torch.device | str = "cpu",
    environ: Mapping[str, str] | None = None,
    allow_download: bool = True,
) -> FeatureExtractor:
    """The extractor ``eval.feature_extractor`` asks for (``auto``: digits CNN when
    ``data.source == "digits"``, else Inception in ``eval.fid_mode``). The digits CNN is the
    one kept off this config's FID reference (:meth:`DigitsRecipe.for_data`).

    Raises:
        ConfigError: Inception weights are missing and cannot be downloaded (the message says
            where to put them); eval.reference=heldout with too few held-out digits.
    """
    kind = eval_cfg.feature_extractor
    if kind == "auto":
        kind = "digits" if data_cfg.source == "digits" else "inception"
    cache_dir = resolve_cache_dir(eval_cfg.cache_dir)
    if kind == "digits":
        split = digits_reference_split(eval_cfg, data_cfg) if data_cfg.source == "digits" else "train"
        return load_digits_extractor(cache_dir=cache_dir, recipe=DigitsRecipe.for_data(data_cfg, reference_split=split),
                                     device=device)
    return InceptionExtractor.load(mode=eval_cfg.fid_mode, weights=eval_cfg.inception_weights, cache_dir=cache_dir,
                                   device=device, environ=environ, allow_download=allow_download)
