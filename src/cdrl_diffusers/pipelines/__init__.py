from .pipeline_cdrl import CDRLPipeline

__all__ = ["CDRLPipeline"]
