"""Moved to :mod:`kvbridge.testing.tiny_model` (shared with kvbridge-sglang's tests); this
name stays for one release. ``python -m kvbridge_vllm.tiny_model DIR`` still works."""

from kvbridge.testing.tiny_model import SPECIALS, VOCAB, WORDS, build, main, prompt

__all__ = ["SPECIALS", "VOCAB", "WORDS", "build", "main", "prompt"]

if __name__ == "__main__":
    main()
