"""Checks that run before any training: every input a later stage needs, found in seconds.

A pipeline that fails at evaluation after hours of training because the Inception weights are
missing, or at its first step because ``data.path`` names nothing, wastes the compute and the
user's time. :func:`preflight` looks at every such input first, cheaply (file headers and a few
images, never whole datasets), and raises the first problem as one :class:`TDCError` line that
names the field or file and what is allowed.

What a run needs depends on what it will do, given as a set of :data:`Need` values:

- ``data``: the data source opens, its images have ``data.image_size`` pixels and a usable
  channel count, and there are enough of them for the held-out split; an IDDPM checkpoint named
  by ``train.init_from`` loads and fits the configured model;
- ``device``: a requested CUDA device exists, and ``train.processes`` GPUs are visible;
- ``budgets``: every group's FLOPs budget is reachable by pruning;
- ``prune``: ``prune.proxy=llm`` has its URL and its key variable;
- ``features``: the evaluation's feature extractor is available (Inception weights found or
  downloadable, or the digits CNN, which is trained locally);
- ``disk``: the run folder can be created and written, with room for its checkpoints.

The tracking store is checked by the caller (``tdc_core`` does not talk to MLflow).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Literal

import torch

from tdc_core.atomic import probe_writable
from tdc_core.config import PipelineConfig
from tdc_core.errors import ConfigError, DataError, WriteError
from tdc_core.evaluation.features import locate_inception_weights, resolve_cache_dir
from tdc_core.evaluation.fid import choose_reference
from tdc_core.method.budgets import check_budgets_reachable
from tdc_core.model.unet import UNet
from tdc_core.training.data import peek_images
from tdc_core.training.import_iddpm import imported_weights
from tdc_core.training.trainer import spec_for

__all__ = ["ALL_NEEDS", "Need", "checkpoint_bytes", "pipeline_checkpoints", "preflight", "run_needs"]

Need = Literal["data", "device", "budgets", "prune", "features", "disk"]
ALL_NEEDS: frozenset[Need] = frozenset({"data", "device", "budgets", "prune", "features", "disk"})

# A training checkpoint holds the weights, their EMA and AdamW's two moments, all fp32.
_CHECKPOINT_COPIES = 4
_BYTES_PER_FLOAT = 4
# Real held-out images scored by evaluation: FID needs a covariance, so at least 2.
_MIN_HELDOUT_FOR_EVAL = 2


def run_needs(config: PipelineConfig) -> frozenset[Need]:
    """What the whole pipeline (``tdc run``, the flow ``tdc``) needs: everything, except the
    feature extractor when no evaluation runs (``eval.enabled=false``)."""
    needs = set(ALL_NEEDS)
    if not config.eval.enabled:
        needs.discard("features")
    return frozenset(needs)


def preflight(
    config: PipelineConfig,
    *,
    run_dir: str | Path | None,
    needs: Collection[Need] = ALL_NEEDS,
    environ: Mapping[str, str] | None = None,
    allow_download: bool = True,
    checkpoints: int | None = None,
) -> list[str]:
    """Check what ``needs`` asks for, in order of cost; return one line per check passed
    (for logs: what was verified, e.g. ``data: digits, 1797 images 1×8×8 (1617 train, 180 held out)``).

    Args:
        run_dir: the run folder the command will write (need not exist yet); None skips the
            ``disk`` check.
        environ: where to read environment variables (default ``os.environ``).
        allow_download: whether missing Inception weights may be downloaded now (before any
            training, instead of at evaluation).
        checkpoints: dense checkpoints the command writes, for the ``disk`` check (default:
            the whole pipeline's, see :func:`pipeline_checkpoints`).

    Raises:
        TDCError: the first problem found (ConfigError, DataError or WriteError), one line.
    """
    environ = os.environ if environ is None else environ
    done: list[str] = []
    # Cheapest and most often wrong first.
    if "prune" in needs:
        done += _check_llm_proxy(config, environ)
    if "device" in needs:
        done.append(_check_device(config))
    if "data" in needs:
        done.append(_check_data(config, evaluates="features" in needs))
        if config.train.init_from is not None:
            done.append(_check_init_from(config))
    if "disk" in needs and run_dir is not None:
        done.append(_check_disk(config, Path(run_dir),
                                checkpoints=pipeline_checkpoints(config) if checkpoints is None else checkpoints))
    if "budgets" in needs:  # counts FLOPs on the meta device: 0.5 s, plus 2-4 s for torch's first use of it
        check_budgets_reachable(config)
        done.append(f"budgets: every group's FLOPs budget is reachable by pruning (budget.k={config.budget.k})")
    if "features" in needs:
        done.append(_check_features(config, environ=environ, allow_download=allow_download))
    return done


# --- the checks -----------------------------------------------------------------------------------


def _check_init_from(config: PipelineConfig) -> str:
    """``train.init_from``: the IDDPM checkpoint loads and fits the configured model, key by key
    and shape by shape (the whole file is read: seconds for ImageNet-64's 0.5 GB)."""
    weights = imported_weights(config.train.init_from, spec=spec_for(config))
    n = sum(t.numel() for t in weights.values())
    return (f"stage 1: IDDPM checkpoint {config.train.init_from} fits the model ({n:,} parameters), "
            f"imported as step {config.train.steps}")


def _check_llm_proxy(config: PipelineConfig, environ: Mapping[str, str]) -> list[str]:
    prune = config.prune
    if not prune.enabled or prune.proxy != "llm":
        return []
    if not prune.llm_url:
        raise ConfigError("prune.proxy=llm needs prune.llm_url (an OpenAI-compatible endpoint, http:// or https://)")
    if not prune.llm_url.startswith(("http://", "https://")):
        raise ConfigError(f"prune.llm_url={prune.llm_url!r} must be an http:// or https:// URL")
    if not environ.get(prune.llm_api_key_env):
        raise ConfigError(f"prune.proxy=llm reads its key from the environment variable {prune.llm_api_key_env} "
                          f"(prune.llm_api_key_env), which is not set or empty; set it, or use prune.proxy=surrogate")
    return [f"prune: llm proxy at {prune.llm_url}, key in ${prune.llm_api_key_env}"]


def _check_device(config: PipelineConfig) -> str:
    train = config.train
    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    if train.device == "cuda" and not cuda:
        raise ConfigError("train.device=cuda but no CUDA device is available here; allowed: auto or cpu")
    on_gpu = train.device == "cuda" or (train.device == "auto" and cuda)
    if on_gpu and train.processes is not None and train.processes > gpus:
        raise ConfigError(f"train.processes={train.processes} but only {gpus} CUDA device(s) are visible; "
                          f"allowed: 1..{gpus}, or unset (one process per GPU)")
    return f"device: {'cuda (' + str(gpus) + ' GPU)' if on_gpu else 'cpu'}"


def _check_data(config: PipelineConfig, *, evaluates: bool) -> str:
    data = config.data
    peek = peek_images(data)
    n = peek.num_images
    if n < 2:
        raise DataError(f"data source {data.source!r} at {data.path} holds {n} image; at least 2 are needed "
                        f"(training images and a held-out split, data.heldout_fraction)")
    heldout = min(n - 1, max(1, round(n * data.heldout_fraction)))  # as tdc_core.training.data.split_heldout
    if evaluates and heldout < _MIN_HELDOUT_FOR_EVAL and peek.exact:
        raise DataError(
            f"data.heldout_fraction={data.heldout_fraction} of {n} images holds out {heldout}; evaluation scores "
            f"the held-out images with FID, which needs at least {_MIN_HELDOUT_FOR_EVAL}; allowed: more images or "
            f"a larger data.heldout_fraction"
        )
    if evaluates and peek.exact:  # eval.reference=heldout with too few held-out images
        choose_reference(config.eval.reference, num_heldout=heldout, num_train=n - heldout,
                         num_samples=config.eval.num_samples)
    c, h, w = peek.sample.shape[1:]
    count = f"{n}" if peek.exact else f"at least {n}"
    where = f" {data.path}" if data.path is not None else ""
    return f"data: {data.source}{where}, {count} images {c}×{h}×{w} ({n - heldout} train, {heldout} held out)"


def checkpoint_bytes(config: PipelineConfig) -> int:
    """Bytes of one dense training checkpoint of ``config``'s model (weights, EMA and AdamW's
    two moments in fp32; pruned experts are smaller). Counted on the meta device: no memory."""
    with torch.device("meta"):
        params = sum(p.numel() for p in UNet(spec_for(config)).parameters())
    return params * _BYTES_PER_FLOAT * _CHECKPOINT_COPIES


def pipeline_checkpoints(config: PipelineConfig) -> int:
    """Dense checkpoints a pipeline writes: the shared model, one per group (pruned ones are
    smaller) and the baseline, each also copied once into the tracking store's artifacts, plus
    one temporary file while a checkpoint is replaced atomically."""
    kept = 1 + config.grouping.num_groups + int(config.baseline.enabled)
    return 2 * kept + 1


def _check_disk(config: PipelineConfig, run_dir: Path, *, checkpoints: int) -> str:
    try:
        existing = probe_writable(run_dir)
    except NotADirectoryError as exc:
        raise WriteError(f"run folder {run_dir} cannot be created: {exc.filename} is a file, not a folder") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise WriteError(f"run folder {run_dir} is not writable: cannot create a file in it or in its nearest "
                         f"existing parent ({reason})", errno=exc.errno) from None
    need = checkpoints * checkpoint_bytes(config)
    free = shutil.disk_usage(existing).free
    if free < need:
        raise WriteError(
            f"run folder {run_dir}: {_gb(free)} free on its disk, but the run writes about {_gb(need)} of "
            f"checkpoints ({checkpoints} × {_gb(checkpoint_bytes(config))}); free space or "
            f"choose another --run-dir"
        )
    return f"disk: {run_dir} writable, {_gb(free)} free (about {_gb(need)} of checkpoints)"


def _check_features(config: PipelineConfig, *, environ: Mapping[str, str], allow_download: bool) -> str:
    kind = config.eval.feature_extractor
    if kind == "auto":
        kind = "digits" if config.data.source == "digits" else "inception"
    if kind == "digits":
        return "features: digits CNN (trained here and cached; not comparable with Inception FID)"
    path = locate_inception_weights(mode=config.eval.fid_mode, configured=config.eval.inception_weights,
                                    cache_dir=resolve_cache_dir(config.eval.cache_dir), environ=environ,
                                    allow_download=allow_download)
    return f"features: Inception ({config.eval.fid_mode}) weights at {path}"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
