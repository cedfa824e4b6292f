"""Errors a user sees: each names the recipe key, plugin or strategy and what is allowed."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PaperhooksError(Exception):
    """Base class of every error paperhooks raises on purpose."""


class RecipeError(PaperhooksError, ValueError):
    """The recipe cannot be used as written (also a ``ValueError``)."""


class UnknownPluginError(RecipeError):
    """A recipe names a plugin that is not installed."""


class ConfigKeyError(RecipeError):
    """A recipe section has a key its schema does not know."""


class ConfigTypeError(RecipeError):
    """A recipe value has the wrong type or an invalid value."""


class IncompatiblePluginsError(RecipeError):
    """Two plugins in one recipe cannot run together."""


class UnsupportedStrategyError(RecipeError):
    """A plugin (or the core) cannot run under the recipe's strategy."""


class UnusedParameterError(PaperhooksError, RuntimeError):
    """Under DDP, a trainable parameter got no gradient on some rank, and the recipe does not
    set ``trainer.find_unused_parameters`` (DDP would hang)."""


class PluginLoadError(PaperhooksError):
    """An installed plugin failed to import, or two distributions claim one name."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
