"""Registries: one per concept with several implementations (samplers, schedules, datasets,
loss weightings, optimisers, predictors, correctors).

A registration records a part's name, its callable and the options it accepts. The options
are read off the callable's signature: every keyword parameter with a default, except the
concept's *context* parameters (what the caller supplies, e.g. a sampler's model and key).
Their defaults become the part's typed sub-config (vdm/config_defaults.py builds
`config.<concept>.<part>` from them), so an option declared in a function signature is
settable from the command line with no other file edited, and an option a part does not
declare is an error that names it.

This module is plain Python: it imports no config library and no JAX, so the pure layers
(vdm/core, vdm/sampling) can register their parts without depending on the run layer.
"""

import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered part.

    Attributes:
      name: the name configs select it by.
      fn: the callable (a function or a factory).
      options: option name -> default, in signature order.
      doc: the first line of the callable's docstring.
    """

    name: str
    fn: Callable
    options: Mapping[str, Any]
    doc: str

    def __call__(self, *args, **kwargs):
        """Calls the registered callable directly (positional arguments allowed)."""
        return self.fn(*args, **kwargs)


def _signature_options(fn: Callable, context: tuple[str, ...]) -> dict[str, Any]:
    options = {}
    for p in inspect.signature(fn).parameters.values():
        if p.name in context or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is not p.empty:
            options[p.name] = p.default
    return options


class Registry:
    """Name -> part for one concept.

    Args:
      concept: what the parts are ("sampler", "schedule", ...), for error messages.
      context: parameter names the caller supplies; they are never options.
    """

    def __init__(self, concept: str, *, context: tuple[str, ...] = ()):
        self.concept = concept
        self.context = tuple(context)
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, fn: Callable | None = None, *, options=None):
        """Registers `fn` under `name` (usable as a decorator when fn is omitted).

        Args:
          name: the part's name; registering a taken name is an error.
          fn: the callable.
          options: explicit option -> default mapping, for callables whose signature does
            not say it (default: read from the signature).

        Returns:
          fn (so the decorator leaves the function as it was).
        """

        def add(fn):
            if name in self._entries:
                raise ValueError(f"{self.concept} {name!r} is already registered.")
            opts = dict(options) if options is not None else _signature_options(fn, self.context)
            doc = (inspect.getdoc(fn) or "").split("\n", 1)[0]
            self._entries[name] = Entry(name, fn, opts, doc)
            return fn

        return add if fn is None else add(fn)

    def unregister(self, name: str) -> None:
        """Removes a registration (for tests that register temporary parts)."""
        self._entries.pop(name, None)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def get(self, name: str) -> Entry:
        """The entry for `name`; an unknown name is a ValueError listing the known ones."""
        if name not in self._entries:
            raise ValueError(
                f"Unknown {self.concept} {name!r}; choose one of {', '.join(self._entries)}."
            )
        return self._entries[name]

    __getitem__ = get

    def check(self, name: str, options: Mapping[str, Any], *, extra: tuple[str, ...] = ()):
        """Raises ValueError naming every option `name` does not accept.

        Args:
          name: the part.
          options: the options given.
          extra: further names the caller accepts on the part's behalf.
        """
        entry = self.get(name)
        allowed = tuple(entry.options) + tuple(extra)
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(
                f"{self.concept} {name!r} got unknown options {', '.join(unknown)}; "
                f"it accepts {', '.join(allowed) or 'none'}."
            )

    def build(self, name: str, options: Mapping[str, Any] | None = None, **context):
        """Calls the part with its options and the context arguments its signature names.

        Args:
          name: the part.
          options: the part's options (each must be one it declares).
          **context: concept-wide arguments; each is passed only when the part's signature
            has a parameter of that name, so parts take just what they use.

        Returns:
          Whatever the part returns.
        """
        options = dict(options or {})
        self.check(name, options)
        entry = self._entries[name]
        params = inspect.signature(entry.fn).parameters
        takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
        ctx = {k: v for k, v in context.items() if takes_all or k in params}
        return entry.fn(**ctx, **options)

    def defaults(self) -> dict[str, dict[str, Any]]:
        """part name -> {option: default} for every part (for building config schemas)."""
        return {name: dict(e.options) for name, e in self._entries.items()}
