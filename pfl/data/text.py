"""The ``text`` modality: character quantization shared by the character-level CNNs (CharCNN, VDCNN).

Source: X. Zhang, J. Zhao, Y. LeCun, "Character-level Convolutional Networks for Text Classification", NIPS 2015,
Section 2.2, and the authors' code, github.com/zhangxiangxiao/Crepe at 449852dc (``train/config.lua:11``, the
alphabet; ``train/data.lua:12-18``, the lookup table; ``train/data.lua:153-164``, ``stringToTensor``).

A text is stored as uint8 character ids (N, :data:`LENGTH`), one id per UTF-8 byte, as Crepe reads Lua strings
(bytes):

- id 0 (:data:`PADDING`): after the end of the text;
- id 1 (:data:`UNKNOWN`): a byte outside the alphabet (a byte of a non-ASCII character, a tab, ...);
- id 2 (:data:`SPACE`): the space;
- ids 3..72 (:data:`ALPHABET_OFFSET` + i): character i of the paper's 70-character :data:`ALPHABET`, in its order:
  26 letters, 10 digits, 33 other characters, the newline.

What is taken over from Crepe: upper-case ASCII letters are read as their lower case (``str:lower()`` in the C locale:
A-Z only; ``data.lua:154``), and the alphabet holds ``-`` twice (positions 36 and 59, counted from 0): Crepe's table
keeps the later one (``data.lua:16-18``), so ``-`` is id 62 and id 39, the earlier slot, is never produced; it stays
counted in :data:`NUM_IDS` so that ids 3..72 are the paper's 70 positions. Deliberate differences:

- The newline is the alphabet's 70th character (id 72), as the paper's Section 2.2 says; Crepe's ``config.lua``
  string has only the 69 others, so Crepe reads a newline as an all-zero vector, like an unknown character.
- Space, unknown characters and padding get ids of their own (Crepe, and the paper, quantize all three as all-zero
  vectors); a one-hot of ids 3..72 gives Crepe's zero vectors back, and VDCNN (Conneau et al., EACL 2017)
  embeds padding, space and unknown as tokens of their own.
- A text longer than :data:`LENGTH` keeps its first :data:`LENGTH` bytes. Crepe instead reads the last 1014 bytes
  backward (``data.lua:158-161``: input position k is byte ``#s - k + 1``, zero vectors after the text's start).
  :func:`read_backward` reverses each stored text in place, padding staying after it, so
  ``read_backward(ids)[:, :1014]`` is Crepe's reading exactly for every text of at most 1024 bytes; for a longer text
  it starts from byte 1024 instead of the text's last byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789-,;.!?:'\"/\\|_@#$%^&*~`+-=<>()[]{}\n"
"""Zhang et al. 2015's 70 characters (Section 2.2; Crepe's ``config.lua:11`` string plus the newline)."""
LENGTH = 1024  # stored ids per text: VDCNN's input length (Conneau et al. 2017); the CharCNN reads 1014 of them
PADDING, UNKNOWN, SPACE = 0, 1, 2
ALPHABET_OFFSET = 3  # id of ALPHABET[i] is ALPHABET_OFFSET + i
NUM_IDS = ALPHABET_OFFSET + len(ALPHABET)  # 73: padding, unknown, space and the 70 alphabet slots


def _byte_ids() -> np.ndarray:
    """uint8 (256,): the id of each byte value (padding is never a byte: it is where the text has ended)."""
    table = np.full(256, UNKNOWN, dtype=np.uint8)
    table[ord(" ")] = SPACE
    for i, char in enumerate(ALPHABET):  # a repeated character keeps its later slot, as Crepe's table does
        table[ord(char)] = ALPHABET_OFFSET + i
    upper = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)
    table[upper] = table[upper + (ord("a") - ord("A"))]
    return table


BYTE_IDS = _byte_ids()


def quantize_many(texts: Sequence[str], length: int = LENGTH) -> np.ndarray:
    """Character ids of many texts at once (module docstring: the ids), vectorized over all their bytes.

    Args:
        texts: N texts; each is read as its UTF-8 bytes (``errors="surrogateescape"``, so a text read from a file
            with that error handler gives back the file's bytes, whatever their encoding).
        length: ids per text; a longer text keeps its first ``length`` bytes, a shorter one is followed by
            :data:`PADDING`.

    Returns:
        uint8 (N, length).

    Raises:
        ValueError: ``length`` < 1.
    """
    if length < 1:
        raise ValueError(f"length must be at least 1, got {length}")
    encoded = [t.encode("utf-8", "surrogateescape")[:length] for t in texts]
    sizes = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    ids = np.zeros((len(encoded), length), dtype=np.uint8)  # PADDING
    ids[np.arange(length) < sizes[:, None]] = BYTE_IDS[np.frombuffer(b"".join(encoded), dtype=np.uint8)]
    return ids


def quantize(text: str, length: int = LENGTH) -> np.ndarray:
    """Character ids of one text: uint8 (length,) (see :func:`quantize_many`)."""
    return quantize_many([text], length)[0]


def read_backward(ids: torch.Tensor) -> torch.Tensor:
    """Each text read from its last character to its first, padding kept after it: Zhang et al.'s backward
    quantization order (Section 2.2; Crepe ``data.lua:158-161``).

    Args:
        ids: (B, L) character ids of any integer dtype, :data:`PADDING` only after each text.

    Returns:
        (B, L), same dtype and device: row b is ``ids[b, n-1], ..., ids[b, 0], 0, ..., 0`` where n is the number of
        non-padding ids of row b.
    """
    lengths = (ids != PADDING).sum(dim=1, keepdim=True)
    position = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return ids.gather(1, torch.where(position < lengths, lengths - 1 - position, position))


@dataclass(frozen=True)
class TextTransform:
    """What turns a gathered batch of character ids into the model's input: int64 ids, nothing else (the models
    one-hot or embed them)."""

    augments = False  # no training augmentation for text (Zhang et al.'s thesaurus replacement is not done)

    def output_shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of a transformed sample: the stored one, (L,)."""
        return stored

    def __call__(self, inputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Model input int64 (B, L) from gathered uint8 ids (B, L) on the device; ``generator`` is unused (no
        augmentation)."""
        return inputs.long()
