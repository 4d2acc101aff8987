"""A configured provider key: its name (the label everywhere), its secret and its limits."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Key:
    """A configured key. `secret` never leaves the credential step of the provider table."""

    name: str
    secret: str = field(repr=False)
    models: frozenset[str] | None = None  # allow-list; None allows every model
    headers: tuple[tuple[str, str], ...] = ()

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models
