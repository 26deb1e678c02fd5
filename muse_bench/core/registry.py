"""A generic name -> object registry with decorators, entry points and did-you-mean errors."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Generic, TypeVar

from muse_bench.core.errors import ConfigError

T = TypeVar("T")


def suggest(name: str, choices: list[str]) -> str:
    """Return ' Did you mean: a, b?' for close matches of `name`, or a list of valid choices."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    if close:
        return f" Did you mean: {', '.join(close)}?"
    return f" Choose one of: {', '.join(sorted(choices))}." if choices else ""


def load_object(spec: str) -> object:
    """Load `module:Name` or `path/to/file.py:Name`."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ConfigError(f"'{spec}' is not of the form module:Name or path/file.py:Name.")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"plugin file '{target}' does not exist.")
        mod_name = f"_muse_plugin_{abs(hash(str(path.resolve())))}"
        if mod_name in sys.modules:  # load each plugin file once per process
            return _attr(sys.modules[mod_name], target, attr)
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ConfigError(f"cannot import plugin file '{target}'.")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # user code: report it in one line
            raise ConfigError(f"importing '{target}' failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ConfigError(f"cannot import module '{target}': {exc}") from exc
    return _attr(module, target, attr)


def _attr(module: object, target: str, attr: str) -> object:
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"'{target}' has no attribute '{attr}'.") from None


class Registry(Generic[T]):
    """Maps names to registered objects; also discovers an entry-point group lazily."""

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._entry_points_loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under `name`."""

        def deco(obj: T) -> T:
            old = self._items.get(name)
            same = old is not None and (
                getattr(old, "__module__", None),
                getattr(old, "__qualname__", None),
            ) == (getattr(obj, "__module__", None), getattr(obj, "__qualname__", None))
            if (
                old is not None and old is not obj and not same
            ):  # a plugin file loaded twice is fine
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = obj
            try:
                obj.registered_name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj

        return deco

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded or self.entry_point_group is None:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.entry_point_group):
            if ep.name in self._items:
                continue
            try:
                obj = ep.load()
            except Exception as exc:
                raise ConfigError(
                    f"{self.kind} plugin '{ep.name}' ({ep.value}) failed to load: {exc}"
                ) from exc
            self._items.setdefault(ep.name, obj)

    def names(self) -> list[str]:
        """All registered names, entry points included, sorted."""
        self._load_entry_points()
        return sorted(self._items)

    def get(self, name: str) -> T:
        """Look up `name`; `module:Name` and `file.py:Name` load a plugin directly."""
        if ":" in name:
            return load_object(name)  # type: ignore[return-value]
        self._load_entry_points()
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} '{name}'.{suggest(name, list(self._items))}")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
