"""Corpus sources, tokenizer, token shards and the deterministic batch reader.

TokenReader (torch) loads on first use, and prepare imports the tokenizer's libraries
(transformers) only when it runs, so prepare's worker processes start quickly.
"""

from __future__ import annotations

from hvdllm.data.index import PreparedData, ShardedTokens, load_prepared, read_prepared
from hvdllm.data.prepare import prepare

__all__ = ["PreparedData", "ShardedTokens", "TokenReader", "load_prepared", "prepare",
           "read_prepared"]


def __getattr__(name: str):
    if name == "TokenReader":
        from hvdllm.data.reader import TokenReader

        return TokenReader
    raise AttributeError(f"module 'hvdllm.data' has no attribute {name!r}")
