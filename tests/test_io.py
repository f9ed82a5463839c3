"""vbpc.io: atomic writes never leave a partial file."""

import pytest

from vbpc.io import atomic_path, atomic_write_bytes, atomic_write_text


def test_atomic_write_and_failure_keeps_original(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write_text(target, "first\n")
    assert target.read_text() == "first\n" and oct(target.stat().st_mode & 0o777) == "0o644"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "first\n"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]  # no temporary left behind
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
