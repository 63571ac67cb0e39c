"""The kit's view of :mod:`kvbridge.buffers` (host buffers with verifiable page patterns)."""

from kvbridge.buffers import RankBuffers, page_pattern

__all__ = ["RankBuffers", "page_pattern"]
