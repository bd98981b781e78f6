from .pipeline_bitdance import BitDancePipeline
