"""Tokenizers and language-model block samplers over 1-D token streams.

* :class:`CharTokenizer` (one id per distinct character) and :class:`ByteTokenizer` (UTF-8 bytes),
  with ``state_dict``/:func:`tokenizer_from_state_dict` round trips;
* :func:`split_tokens` (contiguous train/validation split), :class:`SequentialBlocks` (evaluation)
  and :class:`RandomBlocks` (training batches) of ``(x, y)`` next-token blocks.

Re-exported by :mod:`vbpc.data.text` and :mod:`vbpc.data`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "ByteTokenizer",
    "CharTokenizer",
    "RandomBlocks",
    "SequentialBlocks",
    "split_tokens",
    "tokenizer_from_state_dict",
]


# ----------------------------------------------------------------------------- tokenizers
def _as_id_array(ids: Union[Tensor, np.ndarray, Sequence[int]]) -> np.ndarray:
    if isinstance(ids, Tensor):
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"token ids must be integers, got a {ids.dtype} tensor")
        return ids.detach().cpu().reshape(-1).numpy().astype(np.int64, copy=False)
    arr = np.asarray(ids)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got {arr.dtype}")
    return arr.reshape(-1).astype(np.int64, copy=False)


def _check_range(arr: np.ndarray, vocab_size: int) -> None:
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        vals = np.unique(arr[bad])[:5].tolist()
        raise ValueError(f"{int(bad.sum())} token id(s) out of range 0..{vocab_size - 1}, e.g. {vals}")


class CharTokenizer:
    """Character-level tokenizer: one id per distinct character of a text, in sorted (code point) order.

    ``CharTokenizer(text)`` builds the vocabulary from ``text``.  Characters outside it raise
    ``ValueError`` in :meth:`encode`, unless ``unk`` names a character (added to the
    vocabulary if needed) that stands in for them.  Encoding and decoding are vectorised
    (numpy), so whole corpora take milliseconds.
    """

    def __init__(self, text: str, unk: Optional[str] = None) -> None:
        if unk is not None and len(unk) != 1:
            raise ValueError(f"unk must be a single character, got {unk!r}")
        chars = sorted(set(text) | ({unk} if unk is not None else set()))
        if not chars:
            raise ValueError("CharTokenizer needs a non-empty text to build its vocabulary")
        self.chars: tuple[str, ...] = tuple(chars)
        self.unk = unk
        self._codes = np.array([ord(c) for c in chars], dtype=np.uint32)  # sorted ascending
        self._unk_id = None if unk is None else chars.index(unk)

    @property
    def vocab_size(self) -> int:
        """Number of distinct ids."""
        return len(self.chars)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, unk={self.unk!r})"

    def encode(self, text: str) -> Tensor:
        """The int64 ids of ``text``'s characters, shape ``(len(text),)``."""
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, codes)
        known = self._codes[np.minimum(ids, len(self._codes) - 1)] == codes
        if not known.all():
            if self._unk_id is None:
                unknown = list(dict.fromkeys(chr(c) for c in codes[~known][:10_000]))
                raise ValueError(
                    f"{int((~known).sum())} character(s) not in the vocabulary of {self.vocab_size}, e.g. "
                    f"{unknown[:10]}; build the tokenizer from a text that contains them or pass unk="
                )
            ids[~known] = self._unk_id
        return torch.from_numpy(ids.astype(np.int64))

    def decode(self, ids: Union[Tensor, np.ndarray, Sequence[int]]) -> str:
        """The text of ``ids`` (any integer tensor, array or sequence; flattened)."""
        arr = _as_id_array(ids)
        _check_range(arr, self.vocab_size)
        return self._codes[arr].astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description; :meth:`from_state_dict` rebuilds the tokenizer."""
        return {"type": "char", "chars": "".join(self.chars), "unk": self.unk}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> CharTokenizer:
        """Rebuild a tokenizer saved with :meth:`state_dict` (same ids)."""
        if state.get("type") != "char" or not isinstance(state.get("chars"), str):
            raise ValueError(f"not a CharTokenizer state dict: {state!r:.200}")
        tok = cls(state["chars"], unk=state.get("unk"))
        if "".join(tok.chars) != state["chars"]:
            raise ValueError("CharTokenizer state dict: 'chars' must be distinct characters in sorted order")
        return tok


class ByteTokenizer:
    """UTF-8 byte-level tokenizer: 256 ids, any text encodes; invalid byte sequences decode to U+FFFD."""

    vocab_size = 256

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return "ByteTokenizer()"

    def encode(self, text: str) -> Tensor:
        """The int64 UTF-8 bytes of ``text``."""
        return torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))

    def decode(self, ids: Union[Tensor, np.ndarray, Sequence[int]]) -> str:
        """The text of the bytes ``ids`` (``errors="replace"``); ids outside 0..255 raise ``ValueError``."""
        arr = _as_id_array(ids)
        _check_range(arr, 256)
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def state_dict(self) -> dict[str, Any]:
        """``{"type": "byte"}``."""
        return {"type": "byte"}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ByteTokenizer:
        """Rebuild a tokenizer saved with :meth:`state_dict`."""
        if state.get("type") != "byte":
            raise ValueError(f"not a ByteTokenizer state dict: {state!r:.200}")
        return cls()


def tokenizer_from_state_dict(state: dict[str, Any]) -> Union[CharTokenizer, ByteTokenizer]:
    """Rebuild a :class:`CharTokenizer` or :class:`ByteTokenizer` from its ``state_dict()``."""
    kinds: dict[str, Union[type[CharTokenizer], type[ByteTokenizer]]] = {"char": CharTokenizer, "byte": ByteTokenizer}
    kind = state.get("type")
    if kind not in kinds:
        raise ValueError(f"unknown tokenizer type {kind!r}; expected one of {sorted(kinds)}")
    return kinds[kind].from_state_dict(state)


# ----------------------------------------------------------------------------- LM data
def split_tokens(tokens: Tensor, val_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """Contiguous ``(train, val)`` split of a 1-D token stream: the first ``1 - val_fraction`` and the rest.

    Splitting the stream (not shuffled blocks) keeps validation text out of training.  The
    results are views of ``tokens``; their lengths add up to ``len(tokens)``.
    """
    if tokens.dim() != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(tokens.shape)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = tokens.numel()
    n_val = int(round(n * val_fraction))
    if n_val == 0 or n_val == n:
        raise ValueError(f"a stream of {n} tokens is too short to split with val_fraction={val_fraction}")
    return tokens[: n - n_val], tokens[n - n_val :]


def _check_stream(tokens: Tensor, block_size: int) -> None:
    if not isinstance(tokens, Tensor) or tokens.dim() != 1:
        shape = tuple(getattr(tokens, "shape", ()))
        raise ValueError(f"expected a 1-D token tensor, got {type(tokens).__name__} of shape {shape}")
    if tokens.is_floating_point():
        raise ValueError(f"token ids must be integers, got {tokens.dtype}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if tokens.numel() < block_size + 1:
        raise ValueError(
            f"the token stream has {tokens.numel()} tokens, fewer than block_size + 1 = {block_size + 1} needed for "
            f"one (input, target) block; use a longer text or a smaller block_size"
        )


class SequentialBlocks(Dataset):
    """Non-overlapping ``(x, y)`` blocks for evaluation: block ``i`` is ``x = tokens[iT : iT+T]``, ``y`` shifted by one.

    ``len = (len(tokens) - 1) // block_size``; the final partial block is left out.  Indexing
    with a list or tensor of indices returns stacked ``(B, T)`` batches, so
    :func:`vbpc.data.make_loader` fetches whole batches at once.
    """

    #: ``__getitem__`` accepts a list of indices (see :func:`vbpc.data.make_loader`).
    batch_indexable = True

    def __init__(self, tokens: Tensor, block_size: int) -> None:
        _check_stream(tokens, block_size)
        self.tokens = tokens
        self.block_size = int(block_size)
        self._offsets = torch.arange(self.block_size + 1, device=tokens.device)

    def __len__(self) -> int:
        return (self.tokens.numel() - 1) // self.block_size

    def __getitem__(self, index: Union[int, Sequence[int], Tensor]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(index, dtype=torch.long, device=self.tokens.device)
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"block index out of range for {n} blocks")
        idx = torch.where(idx < 0, idx + n, idx)
        chunk = self.tokens[(idx * self.block_size).unsqueeze(-1) + self._offsets]
        return chunk[..., :-1], chunk[..., 1:]


class RandomBlocks:
    """``steps`` random training batches ``(x, y)`` of shape ``(batch_size, block_size)``, ``y`` = ``x`` shifted by one.

    Block starts are drawn uniformly from ``0 .. len(tokens) - block_size - 1`` with a CPU
    ``torch.Generator`` seeded by ``seed`` (default 0; or the given ``generator``), which persists across
    epochs: two instances with the same seed yield the same batches, epoch after epoch.
    ``tokens`` may live on any device.  Iterate it directly (it yields batches); it is not
    meant for ``DataLoader`` workers, which would repeat the same stream.
    """

    def __init__(
        self,
        tokens: Tensor,
        block_size: int,
        batch_size: int,
        steps: int,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        _check_stream(tokens, block_size)
        if batch_size < 1 or steps < 1:
            raise ValueError(f"batch_size and steps must be >= 1, got {batch_size} and {steps}")
        if generator is not None and seed is not None:
            raise ValueError("pass either seed or generator, not both")
        self.tokens = tokens
        self.block_size = int(block_size)
        self.batch_size = int(batch_size)
        self.steps = int(steps)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(int(seed or 0))
        self._offsets = torch.arange(self.block_size + 1, device=tokens.device)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        high = self.tokens.numel() - self.block_size
        for _ in range(self.steps):
            starts = torch.randint(0, high, (self.batch_size,), generator=self.generator)
            chunk = self.tokens[starts.to(self.tokens.device).unsqueeze(-1) + self._offsets]
            yield chunk[:, :-1], chunk[:, 1:]
