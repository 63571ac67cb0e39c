"""Build a tiny random Llama in Hugging Face format, offline (no downloads).

``python -m kvbridge.testing.tiny_model DIR`` writes a 2-layer Llama (vocab 256, hidden 128, 2
attention heads, 2 KV heads, head_dim 64) with weights from a fixed seed and a word-level
tokenizer whose words are ``w0`` .. ``w249``. Used by the engine adapters' end-to-end tests and
benchmarks: vLLM's and SGLang's CPU backends run it in seconds and greedy decoding is
deterministic. Needs torch, transformers and tokenizers (an engine's environment has them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VOCAB = 256
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
WORDS = VOCAB - len(SPECIALS)


def build(out: str | Path, *, seed: int = 1234, max_positions: int = 2048) -> Path:
    """Write the model and tokenizer to ``out`` (created) and return it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": len(SPECIALS) + i for i in range(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():  # larger weights: outputs vary with the prompt
            p.normal_(0.0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    # vLLM reads the generation defaults; keep them neutral (greedy comes from the request).
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return out


def prompt(n_words: int, seed: int) -> str:
    """A deterministic prompt of ``n_words`` words (tokens) from the tiny vocabulary."""
    import random

    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(WORDS)}" for _ in range(n_words))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    print(build(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
