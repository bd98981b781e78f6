"""Named model sizes: the released BitDance shapes and small ones for tests, demos and benchmarks.

Text-to-image presets give the widths of the Qwen3 language model, the diffusion head and the binary autoencoder;
ImageNet presets those of the class-conditional transformer and its head. `random_pipeline` builds pipelines from
them; ``torch.device("meta")`` builds the real shapes without memory.
"""

# Text-to-image: language model (Qwen3Config), head (BitDanceDiffusionHead) and autoencoder (BitDanceTokenizer)
# arguments. "small" is a few hundred million parameters for CPU runs.
T2I_PRESETS = {
    "tiny": {
        "language_model": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16),
        "head": dict(hidden_size=128, num_layers=2, num_ada_ln_layers=2, attention_head_dim=64),
        "vae": dict(ch=32, ch_mult=(2, 1, 1, 1, 1), num_res_blocks=1),
    },
    "small": {
        "language_model": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                               num_key_value_heads=8, head_dim=64),
        "head": dict(hidden_size=1024, num_layers=6, num_ada_ln_layers=2, attention_head_dim=128),
        "vae": dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1),
    },
    # The real shapes of BitDance-14B (Qwen3-14B, the 1.76 B head, ae_d16c32); vocabulary of the 64x release.
    "14b": {
        "language_model": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                               num_key_value_heads=8, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
                               vocab_size=151988),
        "head": dict(hidden_size=5120, num_layers=6, num_ada_ln_layers=2, attention_head_dim=128),
        "vae": dict(ch=256, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4),
    },
}  # fmt: skip

# Class-conditional ImageNet: the released BitDance-B/L/H (SPEC 4.1; the head is as wide as the backbone) and a tiny
# one for tests. BitDance-B has 242.37 M parameters with the 1x MLP head and 260.1 M with the 4x/16x head.
IMAGENET_PRESETS = {
    "tiny": dict(hidden_size=64, num_layers=2, num_attention_heads=2, head_layers=2, head_ada_ln_layers=2),
    "B": dict(hidden_size=768, num_layers=24, num_attention_heads=12, head_layers=6, head_ada_ln_layers=2),
    "L": dict(hidden_size=1024, num_layers=32, num_attention_heads=16, head_layers=8, head_ada_ln_layers=2),
    "H": dict(hidden_size=1280, num_layers=40, num_attention_heads=20, head_layers=12, head_ada_ln_layers=3),
}
