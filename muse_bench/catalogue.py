"""What `muse list` shows, without importing torch on every call.

Listing the unlearners means importing them, and importing them means importing torch
(seconds). The listing depends only on the installed source and the installed plugins, so
it is computed once and cached under the user's cache directory, keyed by a fingerprint
of both: the harness's version, every module file of `muse_bench` (path, size and mtime)
and the entry points of the plugin group. Any edit or plugin change makes a new listing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from muse_bench import __version__

#: The entry-point groups through which installed packages register plugins.
PLUGIN_GROUPS = ("muse_bench.unlearners", "muse_bench.engines")
#: Bump when the listing's layout changes.
LAYOUT = 2


def cache_dir() -> Path:
    """`$MUSE_CACHE_DIR`, else `$XDG_CACHE_HOME/muse-bench`, else `~/.cache/muse-bench`."""
    if os.environ.get("MUSE_CACHE_DIR"):
        return Path(os.environ["MUSE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "muse-bench"


def _plugin_entry_points() -> list[str]:
    from importlib.metadata import entry_points

    return sorted(
        f"{group}:{ep.name}={ep.value}"
        for group in PLUGIN_GROUPS
        for ep in entry_points(group=group)
    )


def _source_roots() -> list[Path]:
    """The folders of muse_bench and of its unlearners (found without importing them)."""
    import importlib.util

    roots = set()
    for name in ("muse_bench", "muse_bench.unlearners"):
        spec = importlib.util.find_spec(name)
        roots.update(Path(p) for p in (spec.submodule_search_locations or []) if spec)
    return sorted(roots)


def fingerprint() -> str:
    """A hash of what the listing depends on (no module is imported to compute it)."""
    h = hashlib.sha256(f"{__version__}|{LAYOUT}".encode())
    for root in _source_roots():
        for path in sorted(root.rglob("*.py")):
            st = path.stat()
            h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    for ep in _plugin_entry_points():
        h.update(ep.encode())
    return h.hexdigest()[:16]


def build() -> dict[str, Any]:
    """The listing, computed from the registries (imports torch)."""
    from muse_bench.core.hparams import describe
    from muse_bench.data import embedded_benchmark_id
    from muse_bench.engines import ENGINES
    from muse_bench.metrics.mia import available_attacks
    from muse_bench.unlearners import UNLEARNERS

    methods = []
    for name in UNLEARNERS.names():
        cls = UNLEARNERS.get(name)
        embedded = cls.defaults_for(embedded_benchmark_id("news"))  # the default version's
        methods.append(
            {
                "name": name,
                "description": cls.description(),
                "paper_url": getattr(cls, "paper_url", ""),
                "params": [
                    {
                        "name": p.name,
                        "type": p.type,
                        "default": repr(p.default),
                        "embedded": repr(embedded[p.name]) if p.name in embedded else None,
                        "help": p.help,
                    }
                    for p in describe(cls)
                ],
            }
        )
    from muse_bench.robustness.checks import CHECKS, RECOMMENDED_CHECKS

    return {
        "robustness_checks": list(CHECKS),
        "recommended_checks": list(RECOMMENDED_CHECKS),
        "unlearners": methods,
        "attacks": list(available_attacks(with_stats=True, with_ref=True)),
        "engines": list(ENGINES.names()),
    }


def load() -> dict[str, Any]:
    """The listing: from the cache when the source and plugins are unchanged, else built
    and cached (silently uncached where the cache directory is not writable)."""
    from muse_bench.core.errors import MuseError
    from muse_bench.core.io import atomic_write_json

    path = cache_dir() / f"catalogue-{fingerprint()}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    listing = build()
    try:
        atomic_write_json(path, listing)
    except (OSError, MuseError):
        pass
    return listing
