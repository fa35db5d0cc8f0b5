"""Quantities in each SKU's base unit: the conversions behind ``[measures]`` and ``[sku_units]``.

Stock is kept per SKU in one unit, the SKU's *base unit*, so that ``reserved`` and ``issued``
never add boxes to pieces or kilograms to tonnes. A line's quantity as typed (``2箱``) is kept
beside its quantity in the base unit (``24 PCE``).

Two kinds of conversion, each from where the knowledge lives:

- **Physical measures** (mass, volume, length, ...) convert the same way for every SKU:
  ``[measures]`` names each such ERP unit code in `pint`'s unit registry (``KGM =
  "kilogram"``, ``TNE = "metric_ton"``) and pint supplies the factors (in ``Decimal``, so
  1 t = 1000 kg exactly) and refuses to convert between different kinds (kg -> m).
- **Counted units** (a box, a set, a piece) have no physical definition: how many pieces are
  in a box is product master data, so it is declared per SKU in ``[sku_units]``
  (``SKU-100011 = { base = "PCE", BOX = 12 }``). No library can know it; this is a declared
  table on purpose.

A declared factor for a measure (``KGM = 8`` pieces per kilogram) also converts every other
measure of that kind (grams, tonnes) through pint. Anything else - a unit that is neither the
base, nor declared, nor a measure of a declared kind - cannot be converted: ``to_base`` raises
``MappingError`` naming both units, and the event is dead-lettered rather than summed.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from service.errors import MappingError

if TYPE_CHECKING:
    from service.erp.mappings import Mappings

MILLI: Final = Decimal("0.001")
MAX_BASE_QUANTITY: Final = Decimal(10) ** 13  # erp numeric(16, 3)


@dataclass(frozen=True, slots=True)
class SkuUnits:
    """One SKU's base unit and how many base units one of each other unit is."""

    base: str
    """ERP unit code stock of this SKU is kept in"""
    factors: Mapping[str, Decimal]
    """ERP unit code -> base units per one of it; includes the base (1), the declared
    factors and every measure pint converts; a unit not listed cannot be converted"""
    declared: Mapping[str, Decimal]
    """the factors as written in ``[sku_units]`` (without the base)"""


class UnitProblem(ValueError):
    """A ``[measures]`` or ``[sku_units]`` entry that cannot work (the loader names the key)."""


@functools.cache
def _registry() -> Any:
    import pint  # imported here: loading its registry takes ~0.5 s, paid once per process

    return pint.UnitRegistry(non_int_type=Decimal, cache_folder=None)


def release_registry() -> bool:
    """Drop pint's unit registry (True if one was loaded); it is loaded again when a name
    no earlier call answered is asked.

    Why: the registry is needed only while a mappings file is read (the answers per unit
    name are kept by :func:`_measure_problem` and :func:`_factor_between`), yet it held
    ~2.6 MiB of a consumer's RSS for life; collected before the division table loads, its
    pages hold that table instead (a consumer's RSS at start 65.6 -> 63.7 MiB, measured
    step by step). A reload that names only units already read does not load it again."""
    if _registry.cache_info().currsize == 0:
        return False
    _registry.cache_clear()
    gc.collect()  # the registry's units refer back to it: only the cycle collector frees it
    return True


def measure_unit(name: str) -> Any:
    """pint's unit for a ``[measures]`` value; ``UnitProblem`` if pint cannot use it here."""
    import pint

    try:
        unit = _registry().Unit(name)
    except (pint.errors.UndefinedUnitError, pint.errors.DefinitionSyntaxError, ValueError,
            AttributeError, TypeError) as exc:
        raise UnitProblem(f"pint does not know the unit {name!r}") from exc
    if unit.dimensionless:
        raise UnitProblem(f"{name!r} is dimensionless: counted units are declared per SKU "
                          "in [sku_units], not here")
    if _registry().Quantity(Decimal(0), unit).to_base_units().magnitude != 0:
        raise UnitProblem(f"{name!r} has an offset (like °C): not a unit stock can be kept in")
    return unit


@functools.cache
def _measure_problem(name: str) -> str | None:
    """Why ``name`` cannot be a ``[measures]`` unit, None if it can (:func:`measure_unit`),
    kept per name so that pint's registry can be released (:func:`release_registry`)."""
    try:
        measure_unit(name)
    except UnitProblem as exc:
        return str(exc)
    return None


def check_measure(name: str) -> None:
    """:func:`measure_unit`'s check alone: raises ``UnitProblem`` (its message) when ``name``
    cannot be a ``[measures]`` unit; pint's registry is loaded only for a name not asked
    before."""
    problem = _measure_problem(name)
    if problem is not None:
        raise UnitProblem(problem)


def _pint_factor(unit: Any, to: Any) -> Decimal | None:
    """How many ``to`` one ``unit`` is, or None when they measure different things."""
    if unit.dimensionality != to.dimensionality:
        return None
    return Decimal(_registry().Quantity(Decimal(1), unit).to(to).magnitude)


@functools.cache
def _factor_between(unit: str, to: str) -> Decimal | None:
    """:func:`_pint_factor` of two checked measure names, kept per pair (see
    :func:`_measure_problem`)."""
    return _pint_factor(measure_unit(unit), measure_unit(to))


def decimal_factor(value: object) -> Decimal:
    """A factor as written in TOML: an integer, a decimal string ("0.5") or a float (read by
    its shortest text form, so 0.1 means 0.1); must be finite and positive."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise UnitProblem(f"must be a number of base units, not {type(value).__name__}")
    try:
        factor = Decimal(repr(value) if isinstance(value, float) else value)
    except InvalidOperation as exc:
        raise UnitProblem(f"{value!r} is not a number") from exc
    if not factor.is_finite() or factor <= 0:
        raise UnitProblem("must be a positive number of base units")
    return factor


def sku_units(base: str, declared: Mapping[str, Decimal],
              measures: Mapping[str, str]) -> SkuUnits:
    """Complete one SKU's conversion table (``measures``: ERP unit code -> pint name)."""
    for name in measures.values():
        check_measure(name)
    units = dict(measures)  # ERP code -> pint name
    factors: dict[str, Decimal] = {base: Decimal(1)}
    for code, factor in declared.items():
        if code == base:
            raise UnitProblem(f"{code} is the base unit: it is 1 by definition")
        if code in units and base in units and \
                _factor_between(units[code], units[base]) is not None:
            raise UnitProblem(f"{code} and {base} are both measures of one kind: pint "
                              "converts them, a declared factor could only contradict it")
        factors[code] = factor
    # Measures convert through the base, or through a declared measure of the same kind.
    anchors = [(code, factors[code]) for code in (base, *declared) if code in units]
    for code, unit in units.items():
        if code in factors:
            continue
        for anchor, per_anchor in anchors:
            per = _factor_between(unit, units[anchor])
            if per is not None:
                factors[code] = per * per_anchor
                break
    return SkuUnits(base, MappingProxyType(factors), MappingProxyType(dict(declared)))


def to_base(sku: str, quantity: Decimal, unit: str, mappings: Mappings, *,
            raw: object = None, field: str = "quantity") -> Decimal:
    """``quantity`` of ``unit`` (ERP codes) -> the same amount in ``sku``'s base unit.

    Exact: the result must fit the ERP's three decimal places and, for a counted base unit
    (``countable`` in ``[unit_kind]``), be a whole number. Raises ``MappingError(field, raw, ...)``
    naming both units when the unit cannot be converted for this SKU, or the result is not
    representable; ``raw`` is the value as typed (defaults to ``quantity`` and ``unit``).
    """
    shown = raw if raw is not None else f"{quantity} {unit}"
    table = mappings.sku_units.get(sku)
    if table is None:
        raise MappingError(field, shown, f"SKU {sku} has no base unit in [sku_units]")
    factor = table.factors.get(unit)
    if factor is None:
        raise MappingError(field, shown, _why_not(sku, unit, table, mappings))
    value = quantity * factor
    exact = value.quantize(MILLI) if value < MAX_BASE_QUANTITY else None
    if exact is None:
        raise MappingError(field, shown, f"{quantity} {unit} is too large in {table.base}")
    if exact != value:
        raise MappingError(field, shown, f"{quantity} {unit} is {value.normalize():f} "
                                         f"{table.base}, finer than the ERP's 0.001 "
                                         f"{table.base}")
    if is_counted(mappings, table.base) and exact != exact.to_integral_value():
        raise MappingError(field, shown, f"{quantity} {unit} is {value.normalize():f} "
                                         f"{table.base} of {sku}: not a whole number of a "
                                         f"counted unit")
    return exact


def is_counted(mappings: Mappings, unit: str) -> bool:
    """Whether ``unit`` counts whole things: ``[unit_kind]`` says so, else not a measure."""
    kind = mappings.unit_kind.get(unit)
    return kind == "countable" if kind is not None else unit not in mappings.measures


def _why_not(sku: str, unit: str, table: SkuUnits, mappings: Mappings) -> str:
    base = table.base
    if unit in mappings.measures and base in mappings.measures:
        return (f"{unit} cannot be converted to {base}, the base unit of {sku}: "
                f"{mappings.measures[unit]} and {mappings.measures[base]} measure different "
                "things")
    return (f"{unit} cannot be converted to {base}, the base unit of {sku}: declare how many "
            f"{base} one {unit} is under [sku_units] {sku}")


def conversions(mappings: Mappings, pairs: list[tuple[str, str]]
                ) -> tuple[dict[tuple[str, str], tuple[Decimal, str]], dict[tuple[str, str], str]]:
    """For (sku, unit) pairs: ``(factor, base unit)`` where convertible, else the reason."""
    ok: dict[tuple[str, str], tuple[Decimal, str]] = {}
    bad: dict[tuple[str, str], str] = {}
    for sku, unit in pairs:
        table = mappings.sku_units.get(sku)
        if table is None:
            bad[(sku, unit)] = f"SKU {sku} has no base unit in [sku_units]"
        elif unit not in table.factors:
            bad[(sku, unit)] = _why_not(sku, unit, table, mappings)
        else:
            ok[(sku, unit)] = (table.factors[unit], table.base)
    return ok, bad
