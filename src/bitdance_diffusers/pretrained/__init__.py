"""Pipelines shipped inside the package, loadable offline.

``DEMO_MODEL_PATH``: a small text-to-image BitDance (128x128, about 19 MB) trained on the package's synthetic coloured
shapes by `bitdance_diffusers.training.demo`; ``DiffusionPipeline.from_pretrained(DEMO_MODEL_PATH)`` loads it.
"""

from pathlib import Path


DEMO_MODEL_PATH = Path(__file__).resolve().parent / "bitdance-shapes-128"
