"""Byte-level BPE trained with the `tokenizers` library, saved so `transformers` loads it."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hvdllm.data.formats import bad_record, read_records
from hvdllm.errors import UserError

if TYPE_CHECKING:
    from hvdllm.data.sources import Unit

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


def sample_texts(units: list[Unit], budget: int, field: str, keep: Callable[[str], bool],
                 skip_bad: bool = False) -> Iterator[str]:
    """A bounded, deterministic sample to train the tokenizer on: from every unit in turn, its
    first kept documents up to an equal share of `budget` UTF-8 bytes,
    the last one cut to fit. The sample never exceeds `budget`, whatever the corpus size.
    A bad record met on the way raises (formats.bad_record) unless `skip_bad`."""
    share = budget // max(len(units), 1)
    for unit in units:
        left = share
        for path, name in zip(unit.files, unit.names):
            for rec in read_records(path, name, field):
                if left <= 0:
                    break
                if rec.text is None:
                    bad_record(path, rec, skip_bad)
                    continue
                if not keep(rec.name):
                    continue
                data = rec.text.encode("utf-8", errors="replace")[:left]
                left -= len(data)
                yield data.decode("utf-8", errors="ignore")
            if left <= 0:
                break
