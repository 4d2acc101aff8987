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
    weight: float = 1.0  # its share among the keys, until the provider reports their limits
    rpm: int | None = None  # requests per minute it may send, for hosts that report no limits
    tpm: int | None = None  # tokens per minute, likewise

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models
