"""Registries: one per concept with several implementations (samplers, schedules, datasets,
loss weightings, optimisers, predictors, correctors).

A registration records a part's name, its callable and the options it accepts. The options
are read off the callable's signature: every keyword parameter with a default, except the
concept's *context* parameters (what the caller supplies, e.g. a sampler's model and key).
Their defaults become the part's typed sub-config (vdm/config_defaults.py builds
`config.<concept>.<part>` from them), so an option declared in a function signature is
settable from the command line with no other file edited, and an option a part does not
declare is an error that names it.

A part may also take an *argument* in its name: registered with `argument="source"`, the part
`tfds` is selected as `tfds:celeb_a` and called with `source="celeb_a"` (the text after the
first colon). Its options stay in the sub-config of the bare name (`config.data.tfds`).

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
      argument: the parameter that receives the text after ':' in 'name:text' (None: the
        part takes no argument and is named plainly).
      validate: options (defaults filled in) -> None, raising ValueError naming a bad value;
        None when any value of the right name will do.
    """

    name: str
    fn: Callable
    options: Mapping[str, Any]
    doc: str
    argument: str | None = None
    validate: Callable[[dict], None] | None = None

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

    def register(
        self, name: str, fn: Callable | None = None, *, options=None, argument: str | None = None,
        validate: Callable[[dict], None] | None = None,
    ):  # fmt: skip
        """Registers `fn` under `name` (usable as a decorator when fn is omitted).

        Args:
          name: the part's name (no ':'); registering a taken name is an error.
          fn: the callable.
          options: explicit option -> default mapping, for callables whose signature does
            not say it (default: read from the signature).
          argument: a parameter of fn that the name carries: the part is then selected as
            'name:value' and called with argument=value. It is never an option.

        Returns:
          fn (so the decorator leaves the function as it was).
        """
        if ":" in name:
            raise ValueError(f"{self.concept} name {name!r} may not contain ':'.")

        def add(fn):
            if name in self._entries:
                raise ValueError(f"{self.concept} {name!r} is already registered.")
            skip = self.context + ((argument,) if argument else ())
            opts = dict(options) if options is not None else _signature_options(fn, skip)
            doc = (inspect.getdoc(fn) or "").split("\n", 1)[0]
            self._entries[name] = Entry(name, fn, opts, doc, argument, validate)
            return fn

        return add if fn is None else add(fn)

    def unregister(self, name: str) -> None:
        """Removes a registration (for tests that register temporary parts)."""
        self._entries.pop(name, None)

    def __contains__(self, name) -> bool:
        """Whether `name`'s part is registered ('tfds:x' asks about 'tfds')."""
        return isinstance(name, str) and self.part_name(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    @staticmethod
    def split(name: str) -> tuple[str, str | None]:
        """'part:argument' -> ('part', 'argument'); a plain 'part' -> ('part', None)."""
        part, colon, argument = name.partition(":")
        return part, (argument if colon else None)

    def part_name(self, name: str) -> str:
        """The registered part a selected name refers to ('tfds:celeb_a' -> 'tfds'); its
        options live under this name."""
        return self.split(name)[0]

    def get(self, name: str) -> Entry:
        """The entry for `name` ('part' or 'part:argument'); an unknown name, a missing
        argument or an argument to a part that takes none is a ValueError saying so."""
        part, argument = self.split(name)
        if part not in self._entries:
            # Sorted, so the message does not depend on the order modules were imported in.
            known = ", ".join(
                f"{n}:<{e.argument}>" if e.argument else n for n, e in sorted(self._entries.items())
            )
            raise ValueError(f"Unknown {self.concept} {name!r}; choose one of {known}.")
        entry = self._entries[part]
        if entry.argument and not argument:
            usage = f"{part}:<{entry.argument}>"
            raise ValueError(f"{self.concept} {part!r} needs its {entry.argument}: write {usage}.")
        if argument is not None and not entry.argument:
            raise ValueError(f"{self.concept} {part!r} takes no ':' argument (got {name!r}).")
        return entry

    __getitem__ = get

    def check(self, name: str, options: Mapping[str, Any], *, extra: tuple[str, ...] = ()):
        """Raises ValueError naming every option `name` does not accept, or a bad value of
        one (the part's `validate`, given the options with the part's defaults filled in).

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
        if entry.validate is not None:
            entry.validate({**entry.options, **options})

    def build(self, name: str, options: Mapping[str, Any] | None = None, **context):
        """Calls the part with its options and the context arguments its signature names.

        Args:
          name: the part ('part:argument' for a part registered with an argument).
          options: the part's options (each must be one it declares).
          **context: concept-wide arguments; each is passed only when the part's signature
            has a parameter of that name, so parts take just what they use.

        Returns:
          Whatever the part returns.
        """
        options = dict(options or {})
        self.check(name, options)
        entry = self.get(name)
        params = inspect.signature(entry.fn).parameters
        takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
        ctx = {k: v for k, v in context.items() if takes_all or k in params}
        if entry.argument:
            ctx[entry.argument] = self.split(name)[1]
        return entry.fn(**ctx, **options)

    def defaults(self) -> dict[str, dict[str, Any]]:
        """part name -> {option: default} for every part (for building config schemas)."""
        return {name: dict(e.options) for name, e in self._entries.items()}
