from .block_engine import BlockEngine, ForwardRunner
from .cuda_graphs import CUDAGraphRunner, graph_dependencies
from .head_sampler import DiffusionHeadSampler, x_prediction_to_velocity
from .imagenet_transformer import ImageNetTransformerBlockEngine
from .language_model import LanguageModelBlockEngine, cache_argument_name, embed_token_ids
