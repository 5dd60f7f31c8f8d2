"""IDDPM UNet: shapes, dtypes, configurable widths, FLOPs."""

from __future__ import annotations

import pytest
import torch

from tdc_core.config import ModelConfig
from tdc_core.flops import count_forward_flops
from tdc_core.unet import UNet, UNetSpec

CASES = [
    (ModelConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), norm_groups=8), 8, 1, False),
    (ModelConfig(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(8, 4), num_heads=2), 16, 3, True),
    (ModelConfig(base_channels=8, channel_mult=(1, 1, 2), num_res_blocks=1, attention_resolutions=(), resblock_updown=True, use_scale_shift_norm=False), 16, 3, False),
    (ModelConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), num_head_channels=8, dropout=0.1), 8, 1, True),
]


@pytest.mark.parametrize(("model", "size", "channels", "learn_sigma"), CASES)
def test_output_shape_and_dtype(model, size, channels, learn_sigma):
    net = UNet(UNetSpec(model=model, image_size=size, in_channels=channels, learn_sigma=learn_sigma))
    x = torch.randn(3, channels, size, size)
    t = torch.tensor([0, 5, 999])
    y = net(x, t)
    assert y.shape == (3, channels * (2 if learn_sigma else 1), size, size)
    assert y.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x, t).shape == y.shape


def test_output_depends_on_timestep_and_input():
    net = UNet(UNetSpec(model=CASES[0][0], image_size=8, in_channels=1))
    # Residual branches and the output conv start at zero (IDDPM); perturb them so the
    # output carries the timestep signal.
    for p in net.parameters():
        if not p.any():
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 1, 8, 8)
    a = net(x, torch.tensor([1, 1]))
    b = net(x, torch.tensor([500, 500]))
    assert not torch.allclose(a, b)
    assert not torch.allclose(a[0], a[1])


def test_inner_widths_are_configurable_and_rebuild_from_spec():
    model = CASES[1][0]
    dense = UNet(UNetSpec(model=model, image_size=16, in_channels=3))
    res, att = dense.unit_widths()
    assert len(res) == 2 * 3 + 2 + 3 * 3 and len(att) == 2 * 2 + 1 + 3 * 2
    slim_res = [max(1, w // 2) for w in res]
    slim_att = [w // 2 for w in att]
    spec = UNetSpec(model=model, image_size=16, in_channels=3, res_inner=slim_res, attn_inner=slim_att)
    slim = UNet(UNetSpec.from_dict(spec.to_dict()))
    assert slim.unit_widths() == (slim_res, slim_att)
    assert slim(torch.randn(2, 3, 16, 16), torch.tensor([3, 4])).shape == (2, 3, 16, 16)
    f_dense = count_forward_flops(dense, in_channels=3, image_size=16)
    f_slim = count_forward_flops(slim, in_channels=3, image_size=16)
    assert 0.3 * f_dense < f_slim < 0.8 * f_dense
    with pytest.raises(ValueError, match="more widths"):
        UNet(UNetSpec(model=model, image_size=16, in_channels=3, res_inner=res + [4]))


def test_flops_are_counted_per_image_and_match_iddpm_imagenet64():
    """The IDDPM ImageNet-64 UNet: 121 M parameters, ≈79.5 GFLOP per forward pass."""
    model = ModelConfig(base_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                        attention_resolutions=(16, 8), num_heads=4)
    with torch.device("meta"):
        net = UNet(UNetSpec(model=model, image_size=64, in_channels=3, learn_sigma=True))
    params = sum(p.numel() for p in net.parameters())
    assert 120e6 < params < 122e6
    small = UNet(UNetSpec(model=CASES[0][0], image_size=8, in_channels=1))
    f1 = count_forward_flops(small, in_channels=1, image_size=8, batch_size=1)
    f4 = count_forward_flops(small, in_channels=1, image_size=8, batch_size=4)
    assert f1 == f4 > 0
