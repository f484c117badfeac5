"""Where each configuration value came from: the built-in default, a file, a settings layer or a flag.

:func:`specd.shared.config.load_config` applies the file, then any layers (the desktop's settings),
then the overrides (command-line flags). :class:`Origins` remembers which of them set each key, so a
message blames the flag, file or dialog that really set a value, and says "the default" for a value
nobody set. A layer that comes from flags names the flag of each key it sets (``--max-total-tokens``),
and a message then quotes the flag as the user typed it.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec


@dataclass(frozen=True, slots=True)
class ConfigLayer:
    """Values nested like the file (``{"limits": {"max_total_tokens": 256}}``) and where they came from.

    ``where`` names the layer in messages ("Settings", a file path, "the command line"); ``flags`` maps
    a dotted key to the flag that set it (``{"limits.max_total_tokens": "--max-total-tokens"}``).
    """

    values: Mapping[str, Any]
    where: str
    flags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where one value came from: ``where`` is empty for the built-in default."""

    where: str = ""
    flag: str = ""

    @property
    def is_default(self) -> bool:
        return not self.where and not self.flag


DEFAULT = Origin()


def leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` for every value in a nested tree; None is an unset flag and skipped."""
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            yield from leaves(value, dotted)
        elif value is not None:
            yield dotted, value


def key_name(dotted: str) -> str:
    """``limits.max_total_tokens`` as the file spells it: ``[limits] max_total_tokens``."""
    section, _, name = dotted.rpartition(".")
    return f"[{section}] {name}" if section else name


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return msgspec.json.encode(value).decode()
    return repr(value)


class Origins:
    """The origin of every key of one loaded config. ``traced=False``: nothing is known (a config built
    in code), and messages name only the key."""

    def __init__(self, *, traced: bool = True) -> None:
        self._by_key: dict[str, Origin] = {}
        self.traced = traced

    def record(self, layer: ConfigLayer) -> None:
        for dotted, _value in leaves(layer.values):
            self._by_key.pop(dotted, None)  # re-inserted last: the most recent layer to touch a table
            self._by_key[dotted] = Origin(layer.where, layer.flags.get(dotted, ""))

    def of(self, dotted: str) -> Origin | None:
        """The layer that set ``dotted`` (or the table above it, or for a table the last key set in it),
        the default, or None when untraced."""
        if not self.traced:
            return None
        key = dotted
        while key:
            if key in self._by_key:
                return self._by_key[key]
            key = key.rpartition(".")[0]
        inside = [origin for key, origin in self._by_key.items() if key.startswith(dotted + ".")]
        return inside[-1] if inside else DEFAULT

    def name(self, dotted: str) -> str:
        """The key as its source knows it: ``--model-path``, ``[models] draft (in /etc/specd/config.toml)``."""
        origin = self.of(dotted)
        if origin is not None and origin.flag:
            return origin.flag
        return key_name(dotted) + _source_note(origin)

    def describe(self, dotted: str, value: Any) -> str:
        """The value as its source spells it: ``--max-total-tokens 256``,
        ``[limits] max_input_tokens = 4096 (the default)``, ``… = 9 (in /etc/specd/config.toml)``."""
        origin = self.of(dotted)
        if origin is not None and origin.flag:
            if isinstance(value, bool):  # a switch such as --insecure-no-auth or --no-pipeline
                return origin.flag
            return f"{origin.flag} {shlex.quote(value) if isinstance(value, str) else toml_value(value)}"
        return f"{key_name(dotted)} = {toml_value(value)}{_source_note(origin)}"

    def where(self, dotted: str) -> str:
        """A prefix for a message about ``dotted``: the flag, the file, or the defaults."""
        origin = self.of(dotted)
        if origin is None:
            return "config"
        return origin.flag or origin.where or "defaults"


def _source_note(origin: Origin | None) -> str:
    if origin is None:
        return ""
    return " (the default)" if origin.is_default else f" (in {origin.where})"


def flag_layer(args: Any, flag_keys: Mapping[str, str], converted: Mapping[str, Any] | None = None) -> ConfigLayer:
    """The flags the user gave, as a layer naming each one.

    ``flag_keys`` maps a flag to the key it overrides (``{"--port": "server.port"}``); the value is
    ``args.port`` (argparse's name for ``--port``), or ``converted["--port"]`` when the caller parsed
    it itself. Flags left unset (None) are not part of the layer.
    """
    values: dict[str, Any] = {}
    flags: dict[str, str] = {}
    for flag, dotted in flag_keys.items():
        if converted is not None and flag in converted:
            value = converted[flag]
        else:
            value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        *sections, name = dotted.split(".")
        node = values
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
        flags[dotted] = flag
    return ConfigLayer(values, "the command line", flags)
