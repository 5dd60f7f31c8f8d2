"""Run under torchrun by tests/test_speed_paths.py: DDP training, straight vs killed-and-resumed.

Writes ``<out>/result-<rank>.pt`` with this rank's final weights for both runs and its
per-rank view of the first batch, so the test can compare them across ranks and runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tdc_core.config import load_config
from tdc_core.training.distributed import init_distributed
from tests.test_train import make_trainer


def main(out: Path) -> None:
    torch.set_num_threads(1)
    info = init_distributed(device_type="cpu")
    cfg = load_config(preset="smoke", overrides=["train.steps=10", "profile.profile_steps=0", "train.batch_size=16",
                                                 "model.dropout=0.1", "data.random_flip=true", "train.log_every=3"])
    straight = make_trainer(cfg)
    first_batch = straight.sampler.state_dict()["permutation"][:straight.local_batch].clone()
    straight.fit(until_step=10, checkpoint_path=out / "a.pt")
    first = make_trainer(cfg)
    first.fit(until_step=4, checkpoint_path=out / "b.pt")
    del first
    second = make_trainer(cfg)
    second.resume(out / "b.pt")
    second.fit(until_step=10, checkpoint_path=out / "b.pt")
    torch.save({"rank": info.rank, "world": info.world_size, "local_batch": straight.local_batch,
                "first_batch": first_batch, "straight": straight.model.state_dict(),
                "resumed": second.model.state_dict(), "ema": second.ema.state_dict()},
               out / f"result-{info.rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
