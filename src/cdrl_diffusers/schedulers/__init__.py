from .scheduling_cdrl import CDRLScheduler, LangevinCoefficients

__all__ = ["CDRLScheduler", "LangevinCoefficients"]
