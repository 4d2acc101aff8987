"""What the pods of a fleet tell each other about their keys: pure, with no I/O.

A fact is about one key, for one scope (a model, or "*" for the key as a whole):

- `rest`: the key rests for `ttl` more seconds, for a reason (an outcome, or `saturated`);
- `clear`: a probe of the key succeeded, so its rest is over early;
- `own`: the key created a resource (a file, a batch, a stored response; the scope is its id), so
  requests naming that resource go to it, on every pod (resource affinity).

Keys are named by a fingerprint of their secret (HMAC-SHA-256 under a namespace-wide salt),
never by the secret nor by the name a pod gives them: two pods holding the same secret under
different names share its health, and Redis never holds a secret or a piece of one.

Durations travel as time remaining, never as a wall-clock instant, so the pods' clocks need
not agree. A fact read from Redis is validated before it is applied (`decode`): its schema and
size, a fingerprint this pod holds, a known reason, and a duration capped by this pod's own
health settings. It can only rest a key for a bounded time, or end a rest that a proven
success ended: it never changes where requests go otherwise, nor which key values are used.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final

from sidecar.health import HealthSettings
from sidecar.outcome import Outcome

SCHEMA: Final = 1
MAX_MESSAGE: Final = 1024  # bytes: a fact is a few dozen; anything longer is not one of ours
MAX_SCOPE: Final = 256  # a model name, as the proxy bounds it
WIDE: Final = "*"  # the scope of the key as a whole
SATURATED: Final = "saturated"  # a reason that is not an outcome: no room left under a rate limit
REST, CLEAR, OWN = "rest", "clear", "own"
_RESOURCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-/]{0,255}")


def fingerprint(salt: bytes, secret: str) -> str:
    """A key's name in Redis: 128 bits of HMAC-SHA-256 under the namespace's salt."""
    return hmac.new(salt, secret.encode(), hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Fact:
    pod: str  # who learned it (a pod ignores its own facts coming back)
    key: str  # the key's fingerprint
    scope: str  # a model, or WIDE
    op: str  # REST or CLEAR
    why: str = ""  # for REST: an outcome's value, or SATURATED
    ttl: float = 0.0  # for REST: seconds it rests from now
    strikes: int = 0  # for REST: cooldowns in a row, so the next one doubles from there

    def encode(self) -> bytes:
        body: dict[str, Any] = {"v": SCHEMA, "pod": self.pod, "k": self.key, "s": self.scope, "op": self.op}
        if self.op == REST:
            body |= {"why": self.why, "ttl": round(self.ttl, 3), "n": self.strikes}
        return json.dumps(body, separators=(",", ":")).encode()


def cap(why: str, scope: str, settings: HealthSettings) -> float | None:
    """The longest a fact may rest a key for this reason and scope; None: not a reason a fact
    may give for that scope."""
    wide = scope == WIDE
    if why == Outcome.CREDENTIAL_ERROR.value:
        return settings.credential_cooldown_max if wide else None
    if why == Outcome.RATE_LIMITED.value:  # wide: an account out of credit; else incl. daily quotas
        return settings.quota_cooldown if wide else max(settings.rate_limit_cooldown_max, settings.quota_window_max)
    if wide:
        return None
    if why == Outcome.PERMISSION_ERROR.value:
        return settings.model_cooldown_max
    if why in (Outcome.UPSTREAM_ERROR.value, Outcome.TIMEOUT.value, Outcome.CONNECTION_ERROR.value):
        return settings.failure_cooldown_max
    if why == SATURATED:
        return settings.rate_limit_cooldown_max
    return None


class Invalid(ValueError):
    """A message that is not a valid fact: ignored, and counted."""


def decode(raw: bytes | str, known: Collection[str], settings: HealthSettings) -> Fact | None:
    """The fact in a message, validated; None when it concerns no key this pod holds.

    Raises Invalid when it is malformed or asks for more than a fact may."""
    if isinstance(raw, str):
        raw = raw.encode()
    if len(raw) > MAX_MESSAGE:
        raise Invalid("too long")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise Invalid("not JSON") from None
    if not isinstance(body, dict) or body.get("v") != SCHEMA:
        raise Invalid("not a fact of this schema")
    pod, key, scope, op = body.get("pod"), body.get("k"), body.get("s"), body.get("op")
    if not (isinstance(pod, str) and 0 < len(pod) <= 64):
        raise Invalid("bad pod")
    if not (isinstance(key, str) and len(key) == 32 and all(c in "0123456789abcdef" for c in key)):
        raise Invalid("bad key fingerprint")
    if not (isinstance(scope, str) and 0 < len(scope) <= MAX_SCOPE):
        raise Invalid("bad scope")
    if op == CLEAR:
        return Fact(pod, key, scope, CLEAR) if key in known else None
    if op == OWN:
        if not _RESOURCE.fullmatch(scope):
            raise Invalid("bad resource id")
        return Fact(pod, key, scope, OWN) if key in known else None
    if op != REST:
        raise Invalid("bad op")
    why, ttl, strikes = body.get("why"), body.get("ttl"), body.get("n", 0)
    if not isinstance(why, str) or (longest := cap(why, scope, settings)) is None:
        raise Invalid("bad reason")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) or ttl <= 0:
        raise Invalid("bad duration")
    if isinstance(strikes, bool) or not isinstance(strikes, int) or not 0 <= strikes <= 30:
        raise Invalid("bad strikes")
    if key not in known:
        return None
    return Fact(pod, key, scope, REST, why, min(float(ttl), longest), strikes)
