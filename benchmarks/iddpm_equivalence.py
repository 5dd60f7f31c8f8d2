"""Our UNet with IDDPM's weights vs openai/improved-diffusion's own UNetModel, output for output.

Needs a checkout of https://github.com/openai/improved-diffusion (its code is not part of this
repository): ``--iddpm-src`` is the folder holding its ``improved_diffusion`` package. Builds
IDDPM's model with a preset's settings (random weights, every layer, including those IDDPM
zero-initialises), imports its ``state_dict`` through ``tdc_core.training.import_iddpm``'s mapping
and compares the two outputs on random images and timesteps — IDDPM's model fed t·1000/T as its
diffusion does with ``rescale_timesteps``, ours the raw t.

    uv run python benchmarks/iddpm_equivalence.py --iddpm-src /path/to/improved-diffusion --preset cifar10
"""

from __future__ import annotations

import argparse
import sys

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iddpm-src", required=True, help="folder holding the improved_diffusion package")
    ap.add_argument("--preset", default="cifar10", choices=("cifar10", "imagenet64"))
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, args.iddpm_src)
    from improved_diffusion.unet import UNetModel  # the reference implementation

    from tdc_core.config import load_config
    from tdc_core.model.iddpm import from_iddpm_state_dict
    from tdc_core.model.unet import UNet
    from tdc_core.training.trainer import spec_for

    cfg = load_config(preset=args.preset, overrides=["data.path=unused"])
    m = cfg.model
    size = cfg.data.image_size
    attention_ds = tuple(size // r for r in m.attention_resolutions)  # IDDPM lists downsampling rates
    ref = UNetModel(in_channels=3, model_channels=m.base_channels, out_channels=6 if cfg.learn_sigma else 3,
                    num_res_blocks=m.num_res_blocks, attention_resolutions=attention_ds,
                    dropout=m.dropout, channel_mult=tuple(m.channel_mult), num_heads=m.num_heads,
                    use_scale_shift_norm=m.use_scale_shift_norm).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():  # every layer random: zero-initialised ones would hide mistakes
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p[0].numel()) ** 0.5))
    ours = UNet(spec_for(cfg)).eval()
    ours.load_state_dict(from_iddpm_state_dict(ref.state_dict(), model=ours))
    T = cfg.diffusion.num_timesteps
    x = torch.randn(args.batch, 3, size, size, generator=g)
    t = torch.randint(0, T, (args.batch,), generator=g)
    with torch.no_grad():
        a = ref(x, t.float() * (1000.0 / T))
        b = ours(x, t)
        control = ref(x, t.float())  # IDDPM's model fed the raw t: what omitting the rescaling costs
    n_ref, n_ours = (sum(p.numel() for p in mod.parameters()) for mod in (ref, ours))
    diff = (a - b).abs().max().item()
    print(f"{args.preset}: parameters IDDPM {n_ref:,}, ours {n_ours:,}; timesteps {t.tolist()} of T={T}; "
          f"output {tuple(a.shape)}, max |IDDPM - ours| = {diff:.2e} (output scale: max |IDDPM| = {a.abs().max():.3g}; "
          f"control, IDDPM fed raw t: {(control - b).abs().max().item():.3g})")


if __name__ == "__main__":
    main()
