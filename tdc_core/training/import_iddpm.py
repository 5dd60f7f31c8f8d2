"""A released openai/improved-diffusion checkpoint as a TDC shared checkpoint (stage 1 imported).

:func:`read_iddpm_state_dict` loads the file safely (``weights_only``; a file carrying code is
refused), :func:`imported_checkpoint` maps it onto the dense UNet of a config
(:mod:`tdc_core.model.iddpm`) and returns the payload of a normal training checkpoint at step
``train.steps`` — model and EMA both the imported weights, no optimizer or RNG state (IDDPM's
release has neither: AdamW starts afresh and the data order is seeded from ``train.seed`` and
the step) — so profiling, grouping, stage 2 and the baseline continue from it as from a stage 1
trained here. Writes nothing: the caller saves the payload with
:func:`tdc_core.training.checkpoint.save_checkpoint`.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from tdc_core.config import PipelineConfig
from tdc_core.errors import CheckpointError, first_line
from tdc_core.hashing import file_sha256
from tdc_core.model.iddpm import from_iddpm_state_dict
from tdc_core.model.unet import UNet, UNetSpec

__all__ = ["imported_checkpoint", "imported_weights", "read_iddpm_state_dict"]


def read_iddpm_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` in an IDDPM ``.pt`` file (names → tensors, on the CPU).

    Raises:
        CheckpointError: missing or unreadable file, one holding pickled objects, a TDC checkpoint,
            or anything other than a flat name → tensor mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"IDDPM checkpoint {path} does not exist (train.init_from)")
    if not zipfile.is_zipfile(path):  # torch.save's format since torch 1.6 (IDDPM's releases are zips)
        raise CheckpointError(f"IDDPM checkpoint {path} is truncated or not a torch file (no zip archive)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"IDDPM checkpoint {path} was refused: it holds objects other than "
                              f"tensors ({first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types on damaged bytes
        raise CheckpointError(f"IDDPM checkpoint {path} is truncated or not a torch file: "
                              f"{first_line(exc)}") from None
    if isinstance(state, dict) and "format_version" in state:
        raise CheckpointError(f"{path} is a TDC checkpoint, not an IDDPM one: copy it to "
                              f"<run>/checkpoints/last.pt or sample from it directly")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"IDDPM checkpoint {path} is not a state dict (parameter name -> "
                              f"tensor), as improved-diffusion's released .pt files are")
    return state


def imported_weights(path: str | Path, *, spec: UNetSpec) -> dict[str, torch.Tensor]:
    """The IDDPM weights in ``path`` as the ``state_dict`` of the UNet ``spec`` (the dense model,
    :func:`tdc_core.training.trainer.spec_for`).

    Raises:
        CheckpointError: as :func:`read_iddpm_state_dict`, or the checkpoint does not fit the
            model (one line naming the first mismatch and the field to change).
    """
    state = read_iddpm_state_dict(path)
    with torch.device("meta"):  # shapes only: the weights come from the file
        skeleton = UNet(spec)
    return from_iddpm_state_dict(state, model=skeleton, source=f"IDDPM checkpoint {path}")


def imported_checkpoint(config: PipelineConfig, path: str | Path, *, spec: UNetSpec) -> dict[str, Any]:
    """The training-checkpoint payload of ``config``'s dense model ``spec`` holding the IDDPM
    weights in ``path`` (:func:`imported_weights`), at step ``config.train.steps``."""
    weights = imported_weights(path, spec=spec)
    return {
        "kind": "train", "config": config.model_dump(mode="json"), "spec": spec.to_dict(),
        "t_range": [0, config.diffusion.num_timesteps], "step": config.train.steps, "lr": config.train.lr,
        "batch_size": config.train.batch_size, "model": weights,
        # The same tensors: IDDPM releases its EMA weights; loading copies them into each module.
        "ema": dict(weights),
        "optimizer": None, "rng": None, "world_size": 1, "rng_ranks": [], "skipped_steps": 0,
        "imported": {"format": "improved-diffusion", "path": str(path), "sha256": file_sha256(path)},
    }
