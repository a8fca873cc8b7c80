"""Tokenizers built in code (no files, no downloads): the toy character tokenizer, and a Qwen-style one
(no BOS, ``<|im_start|>`` chat template, EOS as pad) for testing the real-model path."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
#: Characters with their own id, after the four special tokens (ids 0..3).
CHARACTERS = "0123456789+-*=:>,. abcdefghijklmnopqrstuvwxyz"
#: Qwen2's special tokens: ``<|endoftext|>`` is both EOS and pad; there is no BOS.
CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: Qwen2's chat format (system turn only when the messages hold one).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _char_core(vocab: dict[str, int], unk: str | None) -> Tokenizer:
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    core.decoder = decoders.Fuse()
    return core


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of ``CHARACTERS``; ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2.

    Encoding with special tokens (the default) prepends ``<bos>``, as Llama's tokenizer does. Padding is
    on the left (what generation needs). ``decode`` joins characters without spaces.
    """
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    core = _char_core(vocab, "<unk>")
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tok.padding_side = "left"
    return tok


def chat_tokenizer(characters: str = CHARACTERS + "\n?!ABCDEFGHIJKLMNOPQRSTUVWXYZ()/\\{}_^") -> PreTrainedTokenizerFast:
    """A Qwen2-style tokenizer: one token per character after ``CHAT_SPECIAL_TOKENS`` (ids 0..2), no BOS
    token, ``<|endoftext|>`` as both EOS and pad, and the ``<|im_start|>`` chat template."""
    vocab = {tok: i for i, tok in enumerate((*CHAT_SPECIAL_TOKENS, *dict.fromkeys(characters)))}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_char_core(vocab, None), eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=list(CHAT_SPECIAL_TOKENS[1:]),
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok
