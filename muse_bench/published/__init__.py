"""Published MUSE numbers shipped with the harness, each table with its source.

- `muse.json`: MUSE's Table 3 (Shi et al., arXiv 2407.06460), target, retrain and the
  eight baselines on both corpora; rows that could not be confirmed from the paper are
  shipped empty and marked `unconfirmed`, never guessed;
- `open_unlearning.json`: open-unlearning's reproduction (docs/repro.md), its 0-1
  values kept as published (`as_published`) and x100 in `metrics`;
- `quantization.json`: the quantization paper's Table 1 (Zhang et al., arXiv
  2410.16454), full precision in `metrics`, 8-bit and 4-bit in `quantized`.

Every row has `method` (this harness's algo name), `corpus`, `metrics` (MUSE's four,
0-100, privleak in percent; null where not published) and `status`.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from muse_bench.core.errors import ConfigError

#: Table id -> file, in the order `muse compare` shows them.
TABLE_FILES = {
    "muse": "muse.json",
    "open-unlearning": "open_unlearning.json",
    "quantization": "quantization.json",
}


@cache
def load_table(table_id: str) -> dict[str, Any]:
    """A published table by id (`muse`, `open-unlearning`, `quantization`)."""
    if table_id not in TABLE_FILES:
        raise ConfigError(f"no published table '{table_id}'; choose from {', '.join(TABLE_FILES)}.")
    text = resources.files(__name__).joinpath(TABLE_FILES[table_id]).read_text(encoding="utf-8")
    return json.loads(text)


def published_row(table_id: str, method: str, corpus: str) -> dict[str, Any] | None:
    """The table's row for `method` on `corpus`, or None when it has none."""
    for row in load_table(table_id)["rows"]:
        if row["method"] == method and row["corpus"] == corpus:
            return row
    return None
