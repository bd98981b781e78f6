from .binary_autoencoder import BinaryEncoderOutput, BitDanceTokenizer
from .diffusion_head import BitDanceDiffusionHead
from .imagenet_transformer import BitDanceImageNetTransformer
from .mlp_head import BitDanceMLPHead
from .projector import BitDanceProjector
