"""The small helpers every module shares: fastreg.files (atomic writes, the cache folder), fastreg.messages and
fastreg.seeding."""

import pytest

from fastreg import files
from fastreg.messages import listing
from fastreg.seeding import mix_seed


def test_cache_dir_is_fastreg_cache_else_the_xdg_cache_home_else_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTREG_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert files.cache_dir("index") == tmp_path / "mine" / "index"
    monkeypatch.delenv("FASTREG_CACHE")
    assert files.cache_dir("features") == tmp_path / "xdg" / "fastreg" / "features"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert files.cache_dir("demo") == tmp_path / "home" / ".cache" / "fastreg" / "demo"


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "list.txt"
    files.atomic_write(path, lambda f: f.write(b"old"))

    def fails_half_way(f):
        f.write(b"ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(path, fails_half_way)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["list.txt"]
    files.atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["list.txt"]


def test_listing_says_how_many_it_left_out():
    assert listing(["a", "b"]) == "a, b"
    assert listing(map(str, range(12))) == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ... (12 in all)"
    assert listing(["x (bad)", "y (bad)", "z (bad)"], first=2, sep="; ") == "x (bad); y (bad); ... (3 in all)"


def test_mix_seed_keeps_purposes_and_positions_apart():
    assert mix_seed("views", 0, 1, 2) == mix_seed("views", 0, 1, 2)
    # a linear mix (seed * 1_000_003 + epoch * 100_003 + i) gives these the same seed; a hash does not
    assert mix_seed("views", 0, 0, 100_003, bits=63) != mix_seed("views", 0, 1, 0, bits=63)
    assert mix_seed("views", 1, 23) != mix_seed("views", 12, 3)  # the parts are separated
    assert mix_seed("views", 0, 1, 2) != mix_seed("epoch", 0, 1, 2)
    seeds = {mix_seed("epoch", seed, epoch, rank) for seed in range(4) for epoch in range(50) for rank in range(8)}
    assert len(seeds) == 4 * 50 * 8 and all(0 <= s < 2**31 for s in seeds)
    assert all(0 <= mix_seed("tie", 0, q, bits=32) < 2**32 for q in range(100))
    with pytest.raises(ValueError, match="bits must be in 1..64"):
        mix_seed("views", 0, bits=65)
