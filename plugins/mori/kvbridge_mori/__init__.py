"""kvbridge-mori: AMD Mori's IOEngine (mori.io) as a kvbridge transport."""

__version__ = "0.1.0"
