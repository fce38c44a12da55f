"""Corpus sources, tokenizer, token files and the deterministic batch reader."""

from hvdllm.data.prepare import PreparedData, load_prepared, prepare
from hvdllm.data.reader import TokenReader

__all__ = ["PreparedData", "TokenReader", "load_prepared", "prepare"]
