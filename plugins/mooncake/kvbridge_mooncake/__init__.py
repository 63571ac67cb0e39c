"""kvbridge-mooncake: the Mooncake transfer engine as a kvbridge transport."""

__version__ = "0.1.0"
