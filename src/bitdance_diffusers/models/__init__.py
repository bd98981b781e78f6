from .binary_autoencoder import BinaryEncoderOutput, BitDanceTokenizer
from .diffusion_head import BitDanceDiffusionHead
from .projector import BitDanceProjector
