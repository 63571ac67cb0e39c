"""kvbridge-nixl: an NVIDIA NIXL agent as a kvbridge transport."""

__version__ = "0.1.0"
