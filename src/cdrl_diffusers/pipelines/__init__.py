from .pipeline_cdrl import CDRLPipeline
from .pipeline_cdrl_compose import CDRLComposePipeline
from .pipeline_cdrl_inpaint import CDRLInpaintPipeline

__all__ = ["CDRLComposePipeline", "CDRLInpaintPipeline", "CDRLPipeline"]
