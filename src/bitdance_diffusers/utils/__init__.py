from .token_layout import binarize, grid_to_sequence, pack_codes, sequence_to_grid, unpack_codes
