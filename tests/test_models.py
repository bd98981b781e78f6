"""Real-size architectures, built on the meta device: parameter counts and key names of the original releases."""

import torch

from bitdance_diffusers import BitDanceDiffusionHead, BitDanceProjector, BitDanceTokenizer


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_ae_d16c32_matches_the_original_checkpoint_layout():
    with torch.device("meta"):
        vae = BitDanceTokenizer(ch=256, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4, z_channels=32)
    state = vae.state_dict()
    assert len(state) == 339
    assert round(count(vae) / 1e6, 2) == 460.29
    assert round(count(vae.encoder) / 1e6, 1) == 198.9 and round(count(vae.decoder) / 1e6, 1) == 261.4
    expected_shapes = {
        "encoder.conv_in.weight": (256, 3, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (512, 256, 1, 1),
        "encoder.down.4.block.0.nin_shortcut.weight": (1024, 512, 1, 1),
        "encoder.conv_out.weight": (32, 1024, 1, 1),
        "decoder.conv_in.weight": (1024, 32, 3, 3),
        "decoder.up.4.upsample.conv1.weight": (4096, 1024, 3, 3),
        "decoder.adaptive.0.gamma.weight": (256, 32),
        "decoder.adaptive.3.beta.weight": (1024, 32),
        "decoder.conv_out.weight": (3, 256, 3, 3),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert vae.downsample_factor == 16


def test_tokenizer_norm_groups_are_configurable(tmp_path):
    vae = BitDanceTokenizer(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, norm_num_groups=4)
    norms = [module for module in vae.modules() if isinstance(module, torch.nn.GroupNorm)]
    assert norms and {norm.num_groups for norm in norms} == {4}
    vae.save_pretrained(tmp_path)
    assert BitDanceTokenizer.from_pretrained(tmp_path).config.norm_num_groups == 4
    default = BitDanceTokenizer(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8)
    assert {m.num_groups for m in default.modules() if isinstance(m, torch.nn.GroupNorm)} == {32}


def test_gan_decoder_takes_codes_and_noise():
    with torch.device("meta"):
        vae = BitDanceTokenizer(ch=128, ch_mult=(1, 1, 2, 2, 4, 8), num_res_blocks=4, z_channels=128, gan_decoder=True)
    assert vae.downsample_factor == 32
    assert tuple(vae.decoder.conv_in.weight.shape) == (1024, 256, 3, 3)


def test_14b_diffusion_head_and_projector_sizes():
    with torch.device("meta"):
        head = BitDanceDiffusionHead(in_channels=32, condition_channels=5120, hidden_size=5120, num_layers=6,
                                     num_ada_ln_layers=2, attention_head_dim=128)  # fmt: skip
        projector = BitDanceProjector(in_channels=32, hidden_size=5120)
    assert count(head) == 1_758_464_032 and len(head.state_dict()) == 88
    assert head.res_blocks[0].attn.heads == 40 and head.ada_ln_switch_freq == 3
    assert tuple(head.state_dict()["res_blocks.0.w2.weight"].shape) == (5120, 7680)
    assert count(projector) == 26_388_480
