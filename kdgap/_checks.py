"""The one parameter validator: integer bounds checked the same way everywhere.

Every public entry point that takes a count (episodes, batch sizes, pairs, shard sizes)
checks it here, before any expensive work, so the error always names the parameter, the
value received and what to pass instead.
"""

from __future__ import annotations

import os
from numbers import Integral
from pathlib import Path


def check_int(
    name: str,
    value: object,
    *,
    minimum: int = 1,
    maximum: int | None = None,
    optional: bool = False,
    hint: str = "",
) -> int | None:
    """``value`` as an ``int`` when it is an integer in ``[minimum, maximum]``, else a
    ``ValueError``.

    Args:
        name: the parameter's name, as the caller's signature spells it.
        value: what the caller passed (``bool`` is refused: ``True`` is no count).
        minimum: the smallest accepted value.
        maximum: the largest accepted value (None: no upper bound).
        optional: also accept None (returned as None), e.g. "all at once".
        hint: appended to the message, e.g. ``"(paper: 50)"``.

    Raises:
        ValueError: e.g. ``"batch_size=0 must be an integer >= 1 or None."`` or
            ``"n_arms=30 must be an integer from 2 to 20."``
    """
    if value is None and optional:
        return None
    if (
        isinstance(value, Integral)
        and not isinstance(value, bool)
        and value >= minimum
        and (maximum is None or value <= maximum)
    ):
        return int(value)
    bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
    tail = " or None" if optional else ""
    extra = f" {hint}" if hint else ""
    raise ValueError(f"{name}={value!r} must be an integer {bound}{tail}.{extra}")


def check_out_folder(out: str | os.PathLike) -> Path:
    """``out`` as a Path, or a ``ValueError`` when it names an existing file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} is a file; pass a folder (created if missing).")
    return out


def check_ints(minimum: int = 1, **values: object) -> None:
    """:func:`check_int` for several parameters at once: ``check_ints(n=n, batch_size=b)``."""
    for name, value in values.items():
        check_int(name, value, minimum=minimum)
