"""The windows of tokens both models are scored on, built the way llama.cpp's perplexity does.

The rule (documented in the README, so another tool can reproduce the numbers):

1. the whole text is tokenized once, with the checkpoint's own tokenizer, without special
   tokens (``tokenizer(text, add_special_tokens=False)``);
2. with a BOS token, the ids are cut into consecutive pieces of ``ctx - 1`` tokens; each
   window is ``[BOS] + piece`` and every token of the piece is scored (the first one is
   predicted from BOS alone);
3. without a BOS token, the pieces have ``ctx`` tokens, and every token but the first of each
   is scored;
4. only complete pieces are used (a text shorter than one piece gives one shorter window);
   ``--max-tokens N`` keeps the first pieces holding at most N scored tokens.

Scoring a window without BOS from the middle of a text is what makes some models look far
worse than they are (Gemma-3-270M: PPL ~36 without, ~17.5 with).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qcli.errors import InputError


@dataclass(frozen=True)
class Windows:
    """Token windows, and which positions of each are scored."""

    windows: list[list[int]]  # token ids, each window at most ctx long
    first_scored: int  # in every window, the first position whose token is scored (1)
    bos: int | None
    ctx: int

    @property
    def tokens(self) -> int:
        """How many tokens are scored in all."""
        return sum(len(w) - self.first_scored for w in self.windows)

    def to_json(self) -> dict:
        return {
            "ctx": self.ctx,
            "windows": len(self.windows),
            "tokens_scored": self.tokens,
            "bos_token_id": self.bos,
            "rule": (
                f"[BOS] + {self.ctx - 1} tokens, all {self.ctx - 1} scored"
                if self.bos is not None
                else f"{self.ctx} tokens, all but the first scored (no BOS token)"
            ),
        }


def build(ids: Sequence[int], bos: int | None, ctx: int, max_tokens: int | None) -> Windows:
    """Windows over the token ids of the whole text (see the module docstring)."""
    if ctx < 2:
        raise InputError(f"--ctx must be at least 2, not {ctx}")
    if max_tokens is not None and max_tokens < 1:
        raise InputError(f"--max-tokens must be positive, not {max_tokens}")
    piece = ctx - 1 if bos is not None else ctx
    scored_per = piece if bos is not None else piece - 1
    count = len(ids) // piece
    if max_tokens is not None:
        count = min(count, max(1, max_tokens // scored_per))
    pieces = [list(ids[i * piece : (i + 1) * piece]) for i in range(count)]
    if not pieces:
        pieces = [list(ids)]  # shorter than one piece: one short window
    if len(pieces[0]) < (1 if bos is not None else 2):
        raise InputError("the text is too short to score (fewer than two tokens)")
    windows = [([bos] if bos is not None else []) + p for p in pieces]
    return Windows(windows, 1, bos, ctx)


def tokenize(tokenizer, text: str) -> list[int]:
    """The whole text's ids, without special tokens (no BOS/EOS added)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
