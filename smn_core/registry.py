"""The one registry style of smn_core: a table of named builders, filled by a decorator.

Datasets (:func:`smn_core.data.register_dataset`), backbones (:func:`smn_core.backbones.register_backbone`)
and mask codecs (:func:`smn_core.mask_codecs.register_codec`) each keep one :class:`Registry`; an entry is
added where its builder is defined, the way timm's ``@register_model`` does::

    @register_codec("gzip", description="gzip (DEFLATE), level 9")
    def _gzip() -> MaskCodec: ...

Plain Python; never imports ray.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

__all__ = ["Registry", "check_choice"]

T = TypeVar("T", bound=Callable[..., Any])


def check_choice(value: Any, allowed: Iterable[str], what: str) -> None:
    """Check that ``value`` is one of ``allowed`` (names, or a mapping's keys).

    Raises:
        ValueError: ``"<what> <value!r> is not known; allowed: <a, b, ...>"``, one line.
    """
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not known; allowed: {', '.join(allowed)}")


class Registry(Generic[T]):
    """Named builders of one ``kind`` (``"dataset"``, ``"backbone"``, ``"codec"``), in registration order.

    ``register(name, **info)`` is a decorator that stores the builder under ``name`` with free-form
    ``info`` (a description, flags) and returns it unchanged; ``registry[name]`` is the builder,
    ``registry.info(name)`` its info, ``registry.names()`` the names in registration order.
    Lookups of an unknown name raise ``KeyError``; the module that owns a registry checks names first
    and raises its own one-line ``ValueError`` listing the allowed ones.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, T] = {}
        self._info: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **info: Any) -> Callable[[T], T]:
        """Decorator registering a builder under ``name``.

        Raises:
            ValueError: ``name`` is not a non-empty str, or is already registered (names the ones that are).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty str, got {name!r}")
        if name in self._builders:
            raise ValueError(f"{self.kind} {name!r} is already registered; registered: {self.names()}")

        def decorator(builder: T) -> T:
            self._builders[name] = builder
            self._info[name] = dict(info)
            return builder

        return decorator

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._builders)

    def info(self, name: str) -> dict[str, Any]:
        """The ``**info`` given when ``name`` was registered (a copy)."""
        return dict(self._info[name])

    def __getitem__(self, name: str) -> T:
        return self._builders[name]

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)
