"""Sweep files: read a YAML/TOML sweep, check it, and expand it into runs.

A sweep file names the sweep and says which runs to make:

    name: npo_news
    defaults: {corpus: news, epochs: 3}   # shared by every run (run keys or hyperparameters)
    grid:                                  # every combination of these values
      algo: [npo]
      lr: [3e-4, 1e-3]
      seed: [0, 1]
    list:                                  # and/or explicit runs; with a grid, each entry
      - {beta: 0.1}                        # is combined with every grid point
      - {beta: 0.5, name: npo_b05}
    run: {bootstrap: 200}                  # `muse run` options shared by every run
    executor: {kind: local, parallel: 2}   # or kind: slurm (see executors.py)
    selection: muse                        # or best_knowmem_r (see results.py)

In a run, the keys `algo`, `corpus`, `protocol`, `seed` and `name` are `muse run`'s
options of those names; every other key is a hyperparameter (`-P key=value`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from muse_bench.core.errors import ConfigError
from muse_bench.core.registry import suggest

#: Keys of a run that are `muse run` options, not hyperparameters.
RUN_KEYS = ("algo", "corpus", "protocol", "seed", "name")
#: Keys of the `run:` table: `muse run` options shared by every run -> RunConfig field.
RUN_OPTIONS = {
    "source": "source",
    "target": "target",
    "retrain": "retrain",
    "select": "select",
    "attack": "attack",
    "device": "device",
    "engine": "engine",
    "batch_size": "batch_size",
    "bootstrap": "n_bootstrap",
    "allow_pickle": "allow_pickle",
    "trust_remote_code": "trust_remote_code",
}
TOP_KEYS = ("name", "description", "defaults", "grid", "list", "run", "executor", "selection")
EXECUTOR_KINDS = ("local", "slurm")
EXECUTOR_KEYS = {
    "local": ("kind", "parallel", "threads"),
    "slurm": (
        "kind",
        "cluster",
        "partition",
        "account",
        "gpus_per_run",
        "cpus_per_run",
        "mem_gb",
        "time",
        "array_parallelism",
        "setup",
        "slurm_args",
    ),
}
SELECTION_RULES = ("muse", "best_knowmem_r")
#: More runs than this need `--yes` (a typo in a grid can multiply a sweep).
MAX_RUNS = 100
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: the `muse run` options and `-P` hyperparameters that define it.

    `params` keeps the order the sweep file gives; `index` is the run's place in the
    expansion (the order selection rules follow).
    """

    index: int
    algo: str
    corpus: str
    protocol: str = "single"
    seed: int = 0
    name: str | None = None
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def method(self) -> str:
        """What the summary groups by: the run's name, else its algorithm."""
        return self.name or self.algo

    def param_args(self) -> tuple[str, ...]:
        """The hyperparameters as `muse run -P` items (`key=value`)."""
        return tuple(f"{k}={param_text(v)}" for k, v in self.params)

    def label(self) -> str:
        """A short human-readable description, for progress lines and dry runs."""
        parts = [self.method, self.corpus]
        if self.protocol != "single":
            parts.append(self.protocol)
        parts.append(f"seed={self.seed}")
        parts += [f"{k}={param_text(v)}" for k, v in self.params]
        return " ".join(parts)


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file: its runs and how to execute and summarise them."""

    name: str
    runs: tuple[SweepRun, ...]
    run_options: Mapping[str, Any] = field(default_factory=dict)
    executor: Mapping[str, Any] = field(default_factory=dict)
    selection: str = "muse"
    description: str = ""
    path: Path | None = None


def param_text(value: Any) -> str:
    """A sweep file's value as `-P` text: lists joined by commas, booleans lower-case."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(param_text(v) for v in value)
    return str(value)


def _toml() -> Any:
    """The TOML parser: the standard library's (Python 3.11+), else `tomli`."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError(
                "TOML sweep files need Python 3.11+ or `pip install tomli`; or use YAML."
            ) from None
    return tomllib


def read_sweep_file(path: Path) -> dict[str, Any]:
    """The mapping in a `.yaml`/`.yml`/`.toml` file, or ConfigError saying why not."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"sweep file '{path}' does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read sweep file '{path}': {exc}.") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = _toml().loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"sweep file '{path}' must end in .yaml, .yml or .toml.")
    except ConfigError:
        raise
    except Exception as exc:  # the parsers' own errors, as one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"sweep file '{path}' is not valid {suffix[1:]}: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file '{path}' must hold a mapping (name:, grid:, ...).")
    return data


def _mapping(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"'{key}' must be a mapping of keys to values.")
    return dict(value)


def _check_keys(found: Sequence[str], allowed: Sequence[str], where: str) -> None:
    for key in found:
        if key not in allowed:
            raise ConfigError(f"unknown key '{key}' in {where}.{suggest(key, list(allowed))}")


def _grid_points(grid: Mapping[str, Any]) -> list[dict[str, Any]]:
    axes = []
    for key, values in grid.items():
        if not isinstance(values, list):
            values = [values]  # a single value is an axis of one
        if not values:
            raise ConfigError(f"grid axis '{key}' is empty; give it at least one value.")
        axes.append([(key, v) for v in values])
    return [dict(combo) for combo in itertools.product(*axes)]


def _list_points(entries: Any) -> list[dict[str, Any]]:
    if not isinstance(entries, list):
        raise ConfigError("'list' must be a list of runs (mappings).")
    if not entries:
        raise ConfigError("'list' is empty; give it at least one run or remove it.")
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"list entry {i} must be a mapping (key: value), not {entry!r}.")
    return [dict(e) for e in entries]


def expand(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The runs a sweep mapping describes, as mappings of run keys and hyperparameters.

    A grid alone gives every combination of its axes (the last axis varies fastest); a
    list alone gives its entries; both give each list entry combined with every grid
    point (a key in both is an error). `defaults` fill what a run does not set.
    """
    has_grid, has_list = "grid" in data, "list" in data
    if not has_grid and not has_list:
        raise ConfigError("the sweep defines no runs: give it a 'grid', a 'list' or both.")
    grid = _grid_points(_mapping(data, "grid")) if has_grid else [{}]
    if has_grid and not _mapping(data, "grid"):
        raise ConfigError("'grid' is empty; give it at least one axis or remove it.")
    entries = _list_points(data["list"]) if has_list else [{}]
    defaults = _mapping(data, "defaults")
    points = []
    for entry in entries:
        for point in grid:
            both = sorted(set(entry) & set(point))
            if both:
                raise ConfigError(
                    f"'{both[0]}' is set both in the grid and in a list entry; set it in one."
                )
            points.append({**defaults, **entry, **point})
    return points


def _run_from_point(index: int, point: Mapping[str, Any]) -> SweepRun:
    for key in ("algo", "corpus"):
        if point.get(key) in (None, ""):
            raise ConfigError(f"run {index + 1} has no '{key}'; set it in defaults, grid or list.")
    seed = point.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"run {index + 1}: seed must be an integer, got {seed!r}.")
    name = point.get("name")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"run {index + 1}: name must be text, got {name!r}.")
    params = tuple((k, v) for k, v in point.items() if k not in RUN_KEYS)
    return SweepRun(
        index=index,
        algo=str(point["algo"]),
        corpus=str(point["corpus"]),
        protocol=str(point.get("protocol", "single")),
        seed=seed,
        name=name,
        params=params,
    )


def parse_sweep(data: Mapping[str, Any], path: Path | None = None) -> Sweep:
    """Check a sweep mapping's structure and expand it (names are checked by `validate`)."""
    _check_keys(list(data), TOP_KEYS, "the sweep file")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            "the sweep needs a 'name' of letters, digits, '.', '_' or '-' (it names its folder)."
        )
    run_options = _mapping(data, "run")
    _check_keys(list(run_options), list(RUN_OPTIONS), "'run'")
    executor = _mapping(data, "executor")
    kind = executor.get("kind", "local")
    if kind not in EXECUTOR_KINDS:
        raise ConfigError(
            f"unknown executor kind '{kind}'.{suggest(str(kind), list(EXECUTOR_KINDS))}"
        )
    _check_keys(list(executor), EXECUTOR_KEYS[kind], f"'executor' (kind {kind})")
    selection = data.get("selection", "muse")
    if selection not in SELECTION_RULES:
        raise ConfigError(
            f"unknown selection rule '{selection}'.{suggest(str(selection), list(SELECTION_RULES))}"
        )
    runs = tuple(_run_from_point(i, p) for i, p in enumerate(expand(data)))
    return Sweep(
        name=name,
        runs=runs,
        run_options=run_options,
        executor={"kind": kind, **executor},
        selection=selection,
        description=str(data.get("description") or ""),
        path=path,
    )


def load_sweep(path: Path) -> Sweep:
    """Read, check and expand a sweep file."""
    return parse_sweep(read_sweep_file(path), Path(path))
