"""Convert an original BitDance ImageNet checkpoint (BitDance_*.pt) into a `BitDanceImageNetPipeline` folder.

    python conversion/convert_bitdance_imagenet.py --checkpoint_path BitDance_B_4x.pt --dump_path BitDance-B-4x-diffusers \
        --vae_checkpoint_path ae_d16c32.pt
"""

import logging

from bitdance_diffusers.conversion.imagenet import main


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
