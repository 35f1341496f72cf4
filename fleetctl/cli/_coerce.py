"""Pydantic-free coercion of fleetctl's plain CLI parameters (start-up cost, SPEC §5 and §11).

Typer ≥ 0.28 coerces every parameter value of the invoked command — even an absent option's ``None`` —
through a pydantic ``TypeAdapter`` built on first use. Importing pydantic and building those adapters
costs ~90 ms per process: more than ``import typer`` itself, paid by every ``fleetctl dispatch`` that a
timer fires and every ``fleetctl task complete`` that an agent runs (measured: bench/bench_startup.py).

fleetctl's parameters are all ``str``, ``int`` (with ``min``/``max``), ``bool``, ``Path`` and lists of
those. ``install()`` makes typer coerce *valid* values of exactly those annotations the way its own
adapters do (typer's ``coerce_cli_path`` still does the path checks), and hands everything else — other
annotations, ``parser=``, ``clamp``, and every value that is not plainly valid — to typer's pydantic path
unchanged, so error messages stay typer's own. If typer's internals move, ``install()`` changes nothing
and typer behaves as shipped (just slower); tests/test_cli_coerce.py compares both paths value by value.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

#: Plain decimal integers that ``int()`` and pydantic read identically (no sign quirks, no ``_``, no padding).
_INT = re.compile(r"(?:0|-?[1-9][0-9]{0,17})")
_SLOW = object()  # "not plainly valid: let typer's own (pydantic) coercion decide"


class FastRuntimeParam:
    """Coerces one parameter like typer's ``AdapterRuntimeParam`` would, without pydantic when it can."""

    def __init__(self, descriptor: Any, build_slow: Any, coerce_path: Any) -> None:
        self.descriptor = descriptor
        self.info = descriptor.parameter_info
        self.is_list = descriptor.is_list
        self.leaf = descriptor.annotation.__args__[0] if self.is_list else descriptor.annotation
        self._build_slow = build_slow
        self._coerce_path = coerce_path
        self._slow_param = None

    def slow(self) -> Any:
        if self._slow_param is None:
            self._slow_param = self._build_slow(self.descriptor)
        return self._slow_param

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        is_multi_value = param.multiple or param.nargs == -1
        if value is None:  # exactly typer's RuntimeParam.coerce for an absent value
            return () if is_multi_value else None
        if is_multi_value and isinstance(value, str):
            return self.slow().coerce(value, param=param, ctx=ctx)
        out = self._coerce_value(value, param, ctx)
        return self.slow().coerce(value, param=param, ctx=ctx) if out is _SLOW else out

    def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
        if not self.is_list:
            return self._leaf(value, param, ctx)
        if not isinstance(value, (list, tuple)):
            return _SLOW
        items = [self._leaf(item, param, ctx) for item in value]
        return _SLOW if any(i is _SLOW for i in items) else items

    def _leaf(self, value: Any, param: Any, ctx: Any) -> Any:
        t = self.leaf
        if t is str:
            return value if type(value) is str else _SLOW
        if t is bool:
            return value if type(value) is bool else _SLOW
        if t is int:
            if type(value) is int:
                n = value
            elif type(value) is str and _INT.fullmatch(value):
                n = int(value)
            else:
                return _SLOW
            if (self.info.min is not None and n < self.info.min) or (self.info.max is not None and n > self.info.max):
                return _SLOW  # out of range: typer words the error
            return n
        if t is Path:
            if isinstance(value, Path):
                path = value
            elif type(value) is str and value:
                path = Path(value)
            else:
                return _SLOW
            return self._coerce_path(path, self.info, path_type=Path, param=param, ctx=ctx)
        return _SLOW


def handles(descriptor: Any) -> bool:
    """True for the annotations ``FastRuntimeParam`` knows: str, int, bool, Path, or a list of one of them."""
    info = descriptor.parameter_info
    if descriptor.file_annotation is not None or info.parser is not None or getattr(info, "clamp", False):
        return False
    if getattr(info, "path_type", None) is not None:
        return False
    annotation = descriptor.annotation
    if descriptor.is_list:
        args = getattr(annotation, "__args__", ())
        if len(args) != 1:
            return False
        annotation = args[0]
    elif getattr(annotation, "__origin__", None) is not None:
        return False
    return annotation in (str, int, bool, Path)


def install() -> bool:
    """Route typer's parameter coercion through ``FastRuntimeParam`` where it applies. Idempotent."""
    try:
        from typer import _coercion, _param_types, core

        cls = core._TyperParameter
        build_slow = _coercion.build_runtime_param
        coerce_path = _param_types.coerce_cli_path
        cls.get_runtime_param  # noqa: B018 - the method we replace must exist
    except (ImportError, AttributeError):
        return False
    if getattr(cls.get_runtime_param, "_fleetctl_fast", False):
        return True

    def get_runtime_param(self: Any) -> Any:
        if getattr(self, "_runtime_param", None) is None:
            d = self.type_descriptor
            self._runtime_param = FastRuntimeParam(d, build_slow, coerce_path) if handles(d) else build_slow(d)
        return self._runtime_param

    get_runtime_param._fleetctl_fast = True  # type: ignore[attr-defined]
    get_runtime_param.__doc__ = cls.get_runtime_param.__doc__
    cls.get_runtime_param = get_runtime_param
    return True
