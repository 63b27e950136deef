r"""A word-level tokenizer over a closed vocabulary, built offline from example texts.

Built for synthetic tasks whose texts use a small, fixed vocabulary (the `clinical` task).
One word costs one token, so a prompt plus its reasoning trace stays short.

How text is cut into pieces. A regex `Split` (``isolated``) covers every character. In
order of priority a piece is:

1. a tag from `DEFAULT_TAGS` or `extra_tokens` (``<think>``, ``</think>``, ``<answer>``,
   ``</answer>``, ``\boxed{``), with an optional single leading space;
2. a word ``[A-Za-z0-9]+`` with an optional single leading space;
3. one other non-space character (``.``, ``,``, ``?``, ``}``...), with an optional
   leading space;
4. one whitespace character (a newline, or a space that no piece above absorbed).

The vocabulary holds every piece seen in `texts`, each both with and without its leading
space (so a word seen only mid-sentence still encodes at the start of a line), plus
``<pad>``, ``<eos>``, ``<bos>`` and ``<unk>``. The decoder joins pieces with nothing in
between (``Fuse``). Tokenization cleanup is off, so ``decode(encode(x)) == x`` exactly for any text whose pieces are all
in the vocabulary. Spaces and newlines are kept as they are, and nothing is normalised.
A piece outside the vocabulary becomes ``<unk>``, which decodes to nothing with
``skip_special_tokens=True`` (or to ``"<unk>"`` without it). A parser of generated text
should still strip the text and treat runs of whitespace as one space: a sampling model
may emit stray space or newline tokens.

``padding_side`` is ``"left"``, as generation needs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from grouprl.models.tiny import SPECIAL_TOKENS

DEFAULT_TAGS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>", "\\boxed{")


def split_pattern(tags: Iterable[str] = DEFAULT_TAGS) -> str:
    """The regex that cuts text into pieces (see the module docstring)."""
    tags = sorted(dict.fromkeys(tags), key=len, reverse=True)  # longest tag wins
    alternatives = []
    if tags:
        alternatives.append(" ?(?:" + "|".join(re.escape(t) for t in tags) + ")")
    alternatives += [r" ?[A-Za-z0-9]+", r" ?[^\sA-Za-z0-9]", r"\s"]
    return "|".join(alternatives)


def _pre_tokenizer(tags: Iterable[str]) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Split(Regex(split_pattern(tags)), behavior="isolated")


def build_word_tokenizer(
    texts: Iterable[str], extra_tokens: Iterable[str] = ()
) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer whose vocabulary is every piece of `texts` (plus the tags).

    `extra_tokens` are more whole-piece tags, added next to `DEFAULT_TAGS`. Each tag is
    always in the vocabulary, with and without a leading space. Token ids are stable:
    the specials come first, then the pieces in sorted order.
    """
    tags = list(dict.fromkeys([*DEFAULT_TAGS, *extra_tokens]))
    pre = _pre_tokenizer(tags)
    pieces: set[str] = set()
    for tag in tags:
        pieces.update((tag, " " + tag))
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text):
            bare = piece[1:] if piece.startswith(" ") and piece.strip() else piece
            pieces.add(bare)
            if bare.strip():  # a word, tag or punctuation mark: both with and without a space
                pieces.add(" " + bare)
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS.values():
        vocab[tok] = len(vocab)
    for p in sorted(pieces):
        vocab.setdefault(p, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        clean_up_tokenization_spaces=False,
        padding_side="left",  # saved with the tokenizer, so a reload keeps it
        **SPECIAL_TOKENS,
    )
    tok.padding_side = "left"
    return tok
