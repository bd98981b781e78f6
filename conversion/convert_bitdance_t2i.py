"""Convert an original BitDance-14B-{16x,64x} release (folder or Hub repo id) into a `BitDancePipeline` folder.

    python conversion/convert_bitdance_t2i.py --checkpoint_path BitDance-14B-64x --dump_path BitDance-14B-64x-diffusers
"""

import logging

from bitdance_diffusers.conversion.t2i import main


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
