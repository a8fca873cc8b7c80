"""A character-level ``PreTrainedTokenizerFast`` built in code (no files, no downloads)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
#: Characters with their own id, after the four special tokens (ids 0..3).
CHARACTERS = "0123456789+-*=:>,. abcdefghijklmnopqrstuvwxyz"


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of ``CHARACTERS``; ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2.

    Padding is on the left (what generation needs). ``decode`` joins characters without spaces.
    """
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tok.padding_side = "left"
    return tok
