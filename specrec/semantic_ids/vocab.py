"""Token vocabulary: five special tokens, then one block of code tokens per semantic-ID level."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD, BOS, EOS, SEP, REC = 0, 1, 2, 3, 4
N_SPECIAL = 5
SPECIAL_NAMES = ("PAD", "BOS", "EOS", "SEP", "REC")


@dataclass(frozen=True)
class Vocabulary:
    """Level l's code c is token N_SPECIAL + offsets[l] + c, so a token also says its level."""

    level_sizes: tuple[int, ...]

    @property
    def n_levels(self) -> int:
        return len(self.level_sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.level_sizes)[:-1]]))

    @property
    def size(self) -> int:
        return N_SPECIAL + int(sum(self.level_sizes))

    def token(self, level: int, code: int) -> int:
        return N_SPECIAL + self.offsets[level] + code

    def tokens(self, codes: np.ndarray) -> np.ndarray:
        """[..., n_levels] codes -> tokens of the same shape."""
        return codes + N_SPECIAL + np.asarray(self.offsets)

    def level_of(self, token: int) -> int:
        """Code level of a token, or -1 for a special token."""
        if token < N_SPECIAL or token >= self.size:
            return -1
        return int(np.searchsorted(np.asarray(self.offsets), token - N_SPECIAL, side="right") - 1)

    def slot_of(self, token: int) -> int:
        """A token's place inside an item: its code level, n_levels for SEP, n_levels + 1 otherwise."""
        if token == SEP:
            return self.n_levels
        level = self.level_of(token)
        return level if level >= 0 else self.n_levels + 1

    def describe(self, token: int) -> str:
        if 0 <= token < N_SPECIAL:
            return SPECIAL_NAMES[token]
        level = self.level_of(token)
        if level < 0:
            return f"<invalid {token}>"
        return f"L{level}:{token - N_SPECIAL - self.offsets[level]}"
