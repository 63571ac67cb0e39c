"""kvbridge-fake: a CPU transport that moves real bytes, with fault injection."""

from kvbridge_fake.faults import FaultPlan

__version__ = "0.1.0"
__all__ = ["FaultPlan", "__version__"]
