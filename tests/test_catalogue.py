"""`muse list` answers from a cached listing without importing torch, and the cache
follows every change of the source or of the installed plugins."""

from __future__ import annotations

import os
import subprocess
import sys

from muse_bench import catalogue

LIST_WITHOUT_TORCH = (
    "import sys\n"
    "from muse_bench.cli import main\n"
    "try:\n"
    "    main(['list'])\n"
    "except SystemExit:\n"
    "    pass\n"
    "print('TORCH_LOADED' if 'torch' in sys.modules else 'NO_TORCH')\n"
)


def _list(cache: str) -> str:
    env = {**os.environ, "MUSE_CACHE_DIR": cache}
    out = subprocess.run(
        [sys.executable, "-c", LIST_WITHOUT_TORCH], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_second_listing_comes_from_the_cache_without_torch(tmp_path):
    first = _list(str(tmp_path))
    second = _list(str(tmp_path))
    assert first.rstrip().endswith("TORCH_LOADED")  # built once, from the registries
    assert second.rstrip().endswith("NO_TORCH")
    assert first.rsplit("\n", 2)[0] == second.rsplit("\n", 2)[0]  # the same listing
    assert "npo " in second and "embedded 0.0005" in second  # the default version's (v3)


def test_cached_listing_equals_a_fresh_build(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSE_CACHE_DIR", str(tmp_path))
    assert catalogue.load() == catalogue.build()  # built and cached
    assert len(list(tmp_path.glob("catalogue-*.json"))) == 1
    assert catalogue.load() == catalogue.build()  # read back


def test_fingerprint_changes_with_the_source_and_the_plugins(tmp_path, monkeypatch):
    before = catalogue.fingerprint()
    assert catalogue.fingerprint() == before
    module = catalogue._source_roots()[0] / "catalogue.py"
    stat = module.stat()
    try:
        os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        assert catalogue.fingerprint() != before
    finally:
        os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert catalogue.fingerprint() == before
    monkeypatch.setattr(catalogue, "_plugin_entry_points", lambda: ["x:my=pkg:Cls"])
    assert catalogue.fingerprint() != before


def test_an_unwritable_cache_still_lists(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MUSE_CACHE_DIR", str(blocker / "sub"))
    assert catalogue.load()["unlearners"]
