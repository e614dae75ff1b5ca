"""One idiom for every zoo of bad inputs: named cases, each with what it must produce.

A zoo is a :class:`Zoo`; cases join it with the ``@zoo.case(...)`` decorator (the function
builds the input) or ``zoo.add(name, make, ...)``; a test is parametrized over
``zoo.params()``, one test per case and variant (a scheme, say).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[..., Any]  # builds the bad input
    expect: tuple[Any, ...]  # what the case must produce (an exit code and needles, a check)
    variants: tuple[str, ...] = ("",)


class Zoo:
    def __init__(self) -> None:
        self.cases: list[Case] = []

    def add(
        self, name: str, make: Callable[..., Any], *expect: Any, variants: Sequence[str] = ("",)
    ) -> None:
        if any(c.id == name for c in self.cases):
            raise ValueError(f"two zoo cases named {name!r}")
        self.cases.append(Case(name, make, tuple(expect), tuple(variants)))

    def case(self, *expect: Any, variants: Sequence[str] = ("",)) -> Callable:
        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.add(fn.__name__, fn, *expect, variants=variants)
            return fn

        return register

    def params(self) -> list:
        return [
            pytest.param(c, v, id=f"{c.id}-{v}" if v else c.id)
            for c in self.cases
            for v in c.variants
        ]

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, name: str) -> Case:
        return next(c for c in self.cases if c.id == name)
