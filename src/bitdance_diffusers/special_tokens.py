"""BitDance's text-to-image prompt format: the chat template and the special tokens the model reads by name.

A conditional row reads ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``; the unconditional branch
(and training's text dropout) reads the prompt-free ``<|im_start|>assistant\\n``. The image prefix follows:
``<|vision_start|> <|res_{H/16}|> <|res_{W/16}|> <|query_1|> .. <|query_{P-1}|>`` (height first). The released
tokenizer carries ``<|res_1|>`` .. ``<|res_256|>`` (16 to 4096 pixels) and ``<|query_1|>`` .. ``<|query_63|>``; the
pipeline looks their ids up by name.
"""

USER_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
UNCONDITIONAL_PROMPT = "<|im_start|>assistant\n"
IMAGE_START_TOKEN = "<|vision_start|>"
IMAGE_END_TOKEN = "<|vision_end|>"

# Pixels per step of the resolution tokens, and how many there are.
RESOLUTION_UNIT = 16
NUM_RESOLUTION_TOKENS = 256
# Query tokens fill the first block after <|res_w|>: P - 1 of them, for blocks of up to 64 tokens.
MAX_QUERY_TOKENS = 63


def resolution_token(pixels: int) -> str:
    """The token of an image side: ``<|res_{pixels / 16}|>``."""
    return f"<|res_{pixels // RESOLUTION_UNIT}|>"


def query_token(index: int) -> str:
    """The ``index``-th query token (1-based): ``<|query_{index}|>``."""
    return f"<|query_{index}|>"


SPECIAL_TOKENS = (
    ["<|im_start|>", "<|im_end|>", IMAGE_START_TOKEN, IMAGE_END_TOKEN]
    + [f"<|res_{k}|>" for k in range(1, NUM_RESOLUTION_TOKENS + 1)]
    + [query_token(k) for k in range(1, MAX_QUERY_TOKENS + 1)]
)
