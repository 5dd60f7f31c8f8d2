"""IDDPM UNet: shapes, dtypes, configurable widths, FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tdc_core.config import ModelConfig
from tdc_core.model.flops import count_forward_flops
from tdc_core.model.unet import AttentionBlock, UNet, UNetSpec

CASES = [
    (ModelConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                 norm_groups=8), 8, 1, False),
    (ModelConfig(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(8, 4),
                 num_heads=2), 16, 3, True),
    (ModelConfig(base_channels=8, channel_mult=(1, 1, 2), num_res_blocks=1, attention_resolutions=(),
                 resblock_updown=True, use_scale_shift_norm=False), 16, 3, False),
    (ModelConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                 num_head_channels=8, dropout=0.1), 8, 1, True),
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


def test_flops_are_counted_per_image():
    small = UNet(UNetSpec(model=CASES[0][0], image_size=8, in_channels=1))
    f1 = count_forward_flops(small, in_channels=1, image_size=8, batch_size=1)
    f4 = count_forward_flops(small, in_channels=1, image_size=8, batch_size=4)
    assert f1 == f4 > 0


def test_iddpm_imagenet64_has_121m_parameters_and_79_5_gflop_per_forward_pass():
    """The IDDPM ImageNet-64 UNet (learned Σ), built and counted on the meta device (no memory,
    no arithmetic). Checked against hand formulas for its parts: the stem convolution, one
    residual block's parameters, and the attention products at 16 and 8 px."""
    model = ModelConfig(base_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                        attention_resolutions=(16, 8), num_heads=4)
    with torch.device("meta"):
        net = UNet(UNetSpec(model=model, image_size=64, in_channels=3, learn_sigma=True))
    assert sum(p.numel() for p in net.parameters()) == 121_063_942
    # A 128 → 128 residual block: two GroupNorms (weight, bias), two 3x3 convs with bias and the
    # time projection 512 → 2·128 (scale and shift).
    block = net.input_blocks[1][0]
    assert sum(p.numel() for p in block.parameters()) == 2 * 2 * 128 + 2 * (128 * 128 * 9 + 128) + 512 * 256 + 256

    total = count_forward_flops(net, in_channels=3, image_size=64)
    assert total == 79_472_754_688 and round(total / 1e9, 1) == 79.5
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, 64, 64, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"))
    per_module = counter.get_flop_counts()
    assert counter.get_total_flops() == total
    # Stem: 3 → 128 channels, 3x3, at 64x64: 2 FLOPs per weight per output pixel.
    assert sum(per_module["UNet.input_blocks.0.0.conv"].values()) == 2 * 3 * 128 * 9 * 64 * 64 == 28_311_552
    # Attention products QKᵀ and AV, 2·L²·C FLOPs each summed over heads: 384 channels at 16 px
    # (L = 256; 3 input + 4 output blocks), 512 at 8 px (L = 64; 3 input, 1 middle, 4 output).
    at16, at8 = 2 * 2 * 256**2 * 384, 2 * 2 * 64**2 * 512
    attention = [f"UNet.{name}" for name, m in net.named_modules() if isinstance(m, AttentionBlock)]
    assert len(attention) == 7 + 8
    # Everything in an attention block but its 1x1 qkv and projection convolutions.
    matmuls = [sum(v for op, v in per_module[name].items() if "convolution" not in str(op)) for name in attention]
    assert sorted(matmuls) == sorted([at16] * 7 + [at8] * 8)
    assert sum(matmuls) == 7 * at16 + 8 * at8 == 771_751_936
