"""Byte-level BPE trained with the `tokenizers` library, saved so `transformers` loads it."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hvdllm.errors import UserError

EOS = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE: any byte sequence encodes, decode(encode(x)) == x."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   unk_token=EOS, model_max_length=1 << 30)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a local Hugging Face tokenizer directory (never the hub)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face tokenizer directory (no tokenizer.json)")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer in {path} has no end-of-text token (eos_token)")
    return tok


def tokenizer_fingerprint(path: str | Path) -> str:
    """Hash of the saved tokenizer.json: two token files are compatible when these match."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise UserError(f"{path} is not a Hugging Face tokenizer directory (no tokenizer.json)")
    return hashlib.sha256(file.read_bytes()).hexdigest()[:16]
