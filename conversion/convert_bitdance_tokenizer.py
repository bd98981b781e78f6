"""Convert an original BitDance binary tokenizer release into a `BitDanceTokenizer` diffusers folder.

    python conversion/convert_bitdance_tokenizer.py --checkpoint_path ae_d16c32.safetensors --dump_path ae_d16c32
"""

import logging

from bitdance_diffusers.conversion.tokenizer import main


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
