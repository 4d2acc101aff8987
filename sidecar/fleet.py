"""The fleet link: what this pod learns about its keys, every pod sharing the Redis of `shared:`
knows within milliseconds, and the other way round. Only with a `shared:` section; without one
keymux never imports this module and keeps its own state, as the embedded default.

The hot path never waits on Redis. Selection reads local state only. What this pod learns
(a health `Change`, a saturation) is put on a bounded queue, without waiting; a writer task
writes it to Redis (a key per (key, scope) whose TTL is the rest left; the later deadline wins,
atomically) and publishes it. A subscriber applies the other pods' facts to local state (the
rules of `LocalHealth.rest`: later deadline wins, never shortened but by a proven success), and
a periodic resync reads every fact in Redis, for messages a pod missed. When a key's rest ends,
one pod of the fleet takes the probe lease (SET NX with a TTL); the others keep it resting until
the probe's verdict arrives or the lease expires.

Every Redis call is bounded by `shared.timeout`. When Redis is unreachable the pod serves from
what it knows, says so (`keymux_shared_store_up` 0, one warning), and reconnects with backoff;
back online it writes what it learned meanwhile and reads what the others did.

Redis keys (one key's data in one Cluster slot: the fingerprint is the hash tag):
  {ns}:salt                    the namespace-wide salt of the fingerprints
  {ns}:h:{<fp>}:<scope id>     a rest: the fact as JSON, expiring when the rest ends
  {ns}:p:{<fp>}:<scope id>     the probe lease of a key whose rest ended
  {ns}:a:{<fp>}:<resource id> a resource the key created (affinity), for as long as keymux keeps it
  {ns}:c:{<fp>}:<bucket>       requests (r) and tokens (t) sent with a key that has a configured
                               rpm/tpm, per 5 s of Redis's own clock, kept 75 s
  {ns}:facts                   the pub/sub channel
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from sidecar.affinity import Owner
from sidecar.capacity import FLEET_STEP, WINDOW
from sidecar.config import SharedConfig
from sidecar.health import ALL_MODELS, Change, HealthSettings, KeyState, Scope
from sidecar.metrics import Count, Family, FamilyCollector, Metrics
from sidecar.outcome import Outcome
from sidecar.runtime import Provider, Runtime
from sidecar.shared import CLEAR, OWN, REST, SATURATED, WIDE, Fact, Invalid, decode, fingerprint

log = logging.getLogger("keymux")

_FAILURES = (RedisError, OSError, TimeoutError)
_SET_IF_LATER = """
local left = redis.call('PTTL', KEYS[1])
if left < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_DELETE_IF_MINE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_BACKOFF_MAX = 10.0


@dataclass(frozen=True, slots=True)
class _Local:
    """A key as this pod knows it."""

    provider: str
    key: str


def _scope_id(scope: str) -> str:
    return scope if scope == WIDE else hashlib.sha256(scope.encode()).hexdigest()[:16]


def _wire(scope: Scope) -> str:
    return WIDE if scope is ALL_MODELS else scope


def _scope(wire: str) -> Scope:
    return ALL_MODELS if wire == WIDE else wire


class FleetLink:
    def __init__(self, config: SharedConfig, runtime: Callable[[], Runtime], metrics: Metrics) -> None:
        self.config = config
        self.runtime = runtime
        self.pod = f"{os.uname().nodename[:40]}-{secrets.token_hex(4)}"
        ns = config.namespace
        self._salt_key, self._channel = f"{ns}:salt", f"{ns}:facts"
        self._state_prefix, self._lease_prefix, self._count_prefix = f"{ns}:h:", f"{ns}:p:", f"{ns}:c:"
        self._owner_prefix = f"{ns}:a:"
        self._redis: aioredis.Redis | RedisCluster | None = None
        self._salt: bytes | None = None
        self._local: dict[str, list[_Local]] = {}  # fingerprint -> the keys here holding that secret
        self._fps: dict[tuple[str, str], str] = {}  # (provider, key) -> fingerprint
        self._queue: asyncio.Queue[Fact] = asyncio.Queue(config.queue_size)
        self._leases: dict[tuple[str, str, str], asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.up = False
        self.loaded = asyncio.Event()  # the first load is done (or Redis could not be reached)
        families = [
            Family("gauge", "keymux_shared_store_up", "1 when this pod reaches the shared Redis, 0 when not"),
            Family(
                "counter",
                "keymux_shared_facts",
                "Facts about keys shared with the fleet: direction out (written, dropped when the queue "
                "was full, failed) or in (applied, unchanged, ignored: not a key held here, invalid)",
                ["direction", "result"],
            ),
            Family("counter", "keymux_shared_resyncs", "Full reads of the fleet's state", ["result"]),
        ]
        self._up_gauge: Count = families[0]()
        self._facts, self._resyncs = families[1], families[2]
        metrics.registry.register(FamilyCollector(families))

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and load the fleet's state, within a bound: a pod that cannot reach Redis
        starts from its own state and keeps trying in the background."""
        self.bind(self.runtime())
        self._tasks = [asyncio.create_task(self._supervise()), asyncio.create_task(self._write())]
        bound = self.config.connect_timeout + 4 * self.config.timeout
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.loaded.wait(), bound)

    async def close(self) -> None:
        tasks = list(self._tasks)  # a finished lease task leaves the list as it ends
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, *_FAILURES):
                pass
        for handle in self._leases.values():
            handle.cancel()
        if self._redis is not None:
            await self._redis.aclose()

    def bind(self, runtime: Runtime) -> None:
        """Watch the records of a (new) runtime: after start, and after each reload."""
        for provider in runtime.providers.values():
            provider.health.watcher = lambda change, p=provider.name: self._learned(p, change)
            provider.capacity.watcher = lambda key, model, seconds, p=provider.name: self._saturated(
                p, key, model, seconds
            )
        runtime.affinity.watcher = self._owned
        self._fingerprints(runtime)

    def _fingerprints(self, runtime: Runtime) -> None:
        self._local, self._fps = {}, {}
        if self._salt is None:
            return
        for provider in runtime.providers.values():
            for key in provider.config.keys:
                fp = fingerprint(self._salt, key.secret)
                self._fps[(provider.name, key.name)] = fp
                self._local.setdefault(fp, []).append(_Local(provider.name, key.name))

    # -- what this pod learned: out, never waiting -----------------------------------------

    def _learned(self, provider: str, change: Change) -> None:
        fp = self._fps.get((provider, change.key))
        if fp is None:
            return
        scope = _wire(change.scope)
        if change.cleared:
            self._put(Fact(self.pod, fp, scope, CLEAR))
            return
        why = change.outcome.value if change.outcome is not None else Outcome.UPSTREAM_ERROR.value
        self._put(Fact(self.pod, fp, scope, REST, why, change.seconds, change.strikes))
        self._plan_probe(provider, change.key, change.scope)

    def _saturated(self, provider: str, key: str, model: str, seconds: float) -> None:
        fp = self._fps.get((provider, key))
        if fp is not None:
            self._put(Fact(self.pod, fp, model, REST, SATURATED, seconds))

    def _owned(self, resource: str, owner: Owner) -> None:
        fp = self._fps.get((owner.provider, owner.key))
        if fp is not None:
            self._put(Fact(self.pod, fp, resource, OWN))

    def _put(self, fact: Fact) -> None:
        try:
            self._queue.put_nowait(fact)
        except asyncio.QueueFull:
            self._facts("out", "dropped").inc()

    async def _write(self) -> None:
        while True:
            fact = await self._queue.get()
            redis = self._redis
            if redis is None or not self.up:
                self._facts("out", "failed").inc()  # merged from local state once Redis is back
                continue
            try:
                await self._store(redis, fact)
                self._facts("out", "written").inc()
            except _FAILURES as exc:
                self._facts("out", "failed").inc()
                self._down(exc)

    async def _store(self, redis: aioredis.Redis | RedisCluster, fact: Fact) -> None:
        payload = fact.encode()
        if fact.op == OWN:
            ttl = int(self.runtime().affinity.ttl * 1000)
            await redis.set(f"{self._owner_prefix}{{{fact.key}}}:{fact.scope}", payload, px=ttl)
            await redis.publish(self._channel, payload)
            return
        await redis.publish(self._channel, payload)  # first: the other pods learn it at once
        scope_id = _scope_id(fact.scope)
        name = f"{self._state_prefix}{{{fact.key}}}:{scope_id}"
        if fact.op == CLEAR:
            await redis.delete(name)
        else:
            await redis.eval(_SET_IF_LATER, 1, name, payload, max(1, int(fact.ttl * 1000)))
        if fact.pod == self.pod and fact.why != SATURATED:  # this pod's verdict: its probe lease has served
            await redis.eval(_DELETE_IF_MINE, 1, f"{self._lease_prefix}{{{fact.key}}}:{scope_id}", self.pod)

    # -- what the others learned: in --------------------------------------------------------

    def receive(self, raw: bytes | str, ttl: float | None = None, stored: bool = False) -> None:
        """Apply one fact from Redis: a message, or a stored fact (a rest whose TTL is `ttl`)."""
        runtime = self.runtime()
        settings = next(iter(runtime.providers.values())).health.settings if runtime.providers else HealthSettings()
        try:
            fact = decode(raw, self._local, settings)
        except Invalid:
            self._facts("in", "invalid").inc()
            return
        if fact is None:
            self._facts("in", "ignored").inc()
            return
        if fact.pod == self.pod and ttl is None and not stored:
            return  # our own message, back from the channel
        if ttl is not None and fact.op == REST:
            fact = Fact(fact.pod, fact.key, fact.scope, REST, fact.why, min(fact.ttl, ttl), fact.strikes)
        changed = False
        for local in self._local.get(fact.key, ()):
            provider = runtime.providers.get(local.provider)
            if provider is not None:
                changed |= self._apply(provider, local.key, fact)
        self._facts("in", "applied" if changed else "unchanged").inc()

    def _apply(self, provider: Provider, key: str, fact: Fact) -> bool:
        if fact.op == OWN:  # the first provider holding that key that keeps affinity
            if not provider.config.affinity or self.runtime().affinity.owner(fact.scope) is not None:
                return False
            self.runtime().affinity.learn(fact.scope, Owner(provider.name, key), announce=False)
            return True
        scope = _scope(fact.scope)
        if fact.op == CLEAR:
            return provider.health.clear(key, scope)
        if fact.why == SATURATED:
            if isinstance(scope, str):
                provider.capacity.hold(key, scope, fact.ttl)
            return True
        changed = provider.health.rest(key, scope, Outcome(fact.why), fact.ttl, fact.strikes)
        if changed:
            self._plan_probe(provider.name, key, scope)
        return changed

    # -- one probe for the fleet -------------------------------------------------------------

    def _plan_probe(self, provider: str, key: str, scope: Scope, at: float | None = None) -> None:
        """Contest the probe lease of a resting key: a moment before its rest ends (so that the
        winner alone is half-open when it does), or at `at`, when a lease lapses."""
        runtime = self.runtime()
        record = runtime.providers.get(provider)
        resting = record.health.resting(key, scope) if record is not None else None
        if resting is None or not resting[1]:
            return
        slot = (provider, key, _wire(scope))
        if (old := self._leases.pop(slot, None)) is not None:
            old.cancel()
        when = resting[0] - 2 * self.config.timeout if at is None else at
        delay = max(when - runtime.clock(), 0.01)
        loop = asyncio.get_running_loop()
        self._leases[slot] = loop.call_later(delay, lambda: self._spawn(self._lease(provider, key, scope)))

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _lease(self, provider: str, key: str, scope: Scope) -> None:
        """One round of the contest: the winner is the one pod where the key is half-open; the
        others hold it until the lease lapses, then contest again. A verdict (a new rest, or a
        proven success) ends the contest everywhere, and frees the lease (`_store`)."""
        self._leases.pop((provider, key, _wire(scope)), None)
        runtime = self.runtime()
        record = runtime.providers.get(provider)
        fp = self._fps.get((provider, key))
        redis = self._redis
        if record is None or fp is None:
            return  # the key left the config
        resting = record.health.resting(key, scope)
        if resting is None or not resting[1]:
            return  # a proven success ended it
        until, _, probing = resting
        now = runtime.clock()
        lease = self.config.probe_lease
        if redis is None or not self.up:  # no fleet to ask: this pod probes on its own, and asks again later
            record.health.release(key, scope)
            self._plan_probe(provider, key, scope, at=now + lease)
            return
        if until > now + 2 * self.config.timeout + 0.05 and until != record.health.held(key, scope):
            self._plan_probe(provider, key, scope)  # it rests longer now: contest before that ends
            return
        name = f"{self._lease_prefix}{{{fp}}}:{_scope_id(_wire(scope))}"
        try:
            if probing:  # this pod's probe is in flight: keep the others off until its verdict
                await redis.set(name, self.pod, px=int(lease * 1000))
                self._plan_probe(provider, key, scope, at=now + lease)
                return
            # Held while the round is open, the last winner included: never two pods half-open.
            record.health.hold(key, scope, now + lease)
            for _ in range(3):  # a lease that lapses between the two calls: try again
                if await redis.set(name, self.pod, nx=True, px=int(lease * 1000)):
                    record.health.release(key, scope)  # this pod probes
                    self._plan_probe(provider, key, scope, at=now + lease)
                    return
                left = await redis.pttl(name)
                if left > 0:
                    break
            else:  # lapsing under our hands three times: another round at once
                self._plan_probe(provider, key, scope, at=now)
                return
        except _FAILURES as exc:
            record.health.release(key, scope)  # no fleet to ask: this pod probes on its own
            self._plan_probe(provider, key, scope, at=now + lease)  # and it rejoins the rounds later
            self._down(exc)
            return
        record.health.hold(key, scope, now + left / 1000)
        self._plan_probe(provider, key, scope, at=now + left / 1000)

    # -- the connection -----------------------------------------------------------------------

    async def _supervise(self) -> None:
        backoff = 0.5
        while True:
            try:
                await self._connect()
                backoff = 0.5
                await self._serve()
            except asyncio.CancelledError:
                raise
            except _FAILURES as exc:
                self._down(exc)
            self.loaded.set()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _connect(self) -> None:
        config = self.config
        if self._redis is not None:
            await self._redis.aclose()
        options: dict[str, Any] = {
            "password": config.password,
            "socket_timeout": config.timeout,
            "socket_connect_timeout": config.connect_timeout,
        }
        redis: aioredis.Redis | RedisCluster
        if config.cluster:
            redis = RedisCluster.from_url(config.redis_url, **options)
        else:
            redis = aioredis.from_url(config.redis_url, retry_on_timeout=False, **options)
        self._redis = redis
        await redis.set(self._salt_key, secrets.token_hex(32), nx=True)
        salt = await redis.get(self._salt_key)
        if not salt:
            raise RedisError("the namespace's salt is missing")
        self._salt = salt if isinstance(salt, bytes) else salt.encode()
        self._fingerprints(self.runtime())

    async def _serve(self) -> None:
        redis = self._redis
        assert redis is not None
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._channel)
            await self._push()
            await self._pull()
            await self._pull_owners()
            self._up(True)
            self.loaded.set()
            loop = asyncio.get_running_loop()
            resync = loop.time() + self.config.resync_interval
            count = loop.time()
            while True:
                if not self.up:  # a write failed: start over, and merge both ways once back
                    raise RedisError("a write to the shared store failed")
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                if message is not None and message.get("type") == "message":
                    self.receive(message["data"])
                if loop.time() >= count:
                    await self._count()
                    count = loop.time() + 1.0
                if loop.time() >= resync:
                    await self._pull()
                    resync = loop.time() + self.config.resync_interval
        finally:
            await pubsub.aclose()

    async def _count(self) -> None:
        """Add this pod's sends under configured rpm/tpm to the fleet's, and read the fleet's
        last minute back, in buckets of Redis's clock (the pods' own need not agree)."""
        runtime = self.runtime()
        limited = [(p, key) for p in runtime.providers.values() for key in p.capacity.limited]
        if not limited:
            return
        redis = self._redis
        assert redis is not None
        seconds, _ = await redis.time()
        bucket = int(seconds // FLEET_STEP)
        async with redis.pipeline(transaction=False) as pipe:
            for provider in runtime.providers.values():
                for key, requests, tokens in provider.capacity.unshared_counts():
                    if (fp := self._fps.get((provider.name, key))) is not None:
                        name = f"{self._count_prefix}{{{fp}}}:{bucket}"
                        pipe.hincrby(name, "r", requests)
                        pipe.hincrby(name, "t", tokens)
                        pipe.expire(name, int(WINDOW + 3 * FLEET_STEP))
            read = []
            for provider, key in limited:
                if (fp := self._fps.get((provider.name, key))) is not None:
                    read.append((provider, key))
                    for back in range(int(WINDOW // FLEET_STEP)):
                        pipe.hmget(f"{self._count_prefix}{{{fp}}}:{bucket - back}", "r", "t")
            found = await pipe.execute(raise_on_error=False)
        # Only HMGET answers lists; a stray key of another type answers an error: no count.
        per_key = int(WINDOW // FLEET_STEP)
        tail = found[len(found) - len(read) * per_key :]
        counts = [pair if isinstance(pair, list) else [None, None] for pair in tail]
        for i, (provider, key) in enumerate(read):
            buckets = counts[i * per_key : (i + 1) * per_key]
            requests = sum(int(r or 0) for r, _ in buckets)
            tokens = sum(int(t or 0) for _, t in buckets)
            provider.capacity.fleet_counts(key, requests, tokens)

    async def _push(self) -> None:
        """Write what this pod knows (learned while Redis was away): the later deadline wins."""
        redis = self._redis
        assert redis is not None
        for fact in self._local_facts():
            await self._store(redis, fact)

    def _local_facts(self) -> Iterator[Fact]:
        runtime = self.runtime()
        now = runtime.clock()
        for provider in runtime.providers.values():
            for status in provider.statuses():
                fp = self._fps.get((provider.name, status.key))
                if fp is None or status.until is None or status.until <= now:
                    continue
                if status.state is KeyState.SATURATED:
                    if status.scope is not ALL_MODELS:
                        yield Fact(self.pod, fp, status.scope, REST, SATURATED, status.until - now)
                    continue
                why = (status.last_outcome or Outcome.UPSTREAM_ERROR).value
                yield Fact(self.pod, fp, _wire(status.scope), REST, why, status.until - now)

    async def _pull(self) -> None:
        """Read every fact in Redis, for what the channel did not bring."""
        redis = self._redis
        assert redis is not None
        try:
            names = [name async for name in redis.scan_iter(match=f"{self._state_prefix}*", count=500)]
            for start in range(0, len(names), 200):
                batch = names[start : start + 200]
                async with redis.pipeline(transaction=False) as pipe:
                    for name in batch:
                        pipe.get(name)
                        pipe.pttl(name)
                    found = await pipe.execute(raise_on_error=False)  # a stray key of another type
                for raw, left in zip(found[::2], found[1::2], strict=True):
                    if not isinstance(raw, bytes | str) or not isinstance(left, int):
                        self._facts("in", "invalid").inc()
                    elif left > 0:
                        self.receive(raw, left / 1000)
        except _FAILURES:
            self._resyncs("failure").inc()
            raise
        self._resyncs("success").inc()

    async def _pull_owners(self) -> None:
        """Which key created which resource, as the fleet learned it: at start and after a
        reconnect (live changes come by the channel), at most what the affinity map keeps."""
        redis = self._redis
        assert redis is not None
        limit = self.runtime().affinity.capacity
        names = []
        async for name in redis.scan_iter(match=f"{self._owner_prefix}*", count=1000):
            names.append(name)
            if len(names) >= limit:
                break
        for start in range(0, len(names), 500):
            async with redis.pipeline(transaction=False) as pipe:  # not MGET: the keys span Cluster slots
                for name in names[start : start + 500]:
                    pipe.get(name)
                found = await pipe.execute(raise_on_error=False)
            for raw in found:
                if isinstance(raw, bytes | str):
                    self.receive(raw, stored=True)
                elif raw is not None:
                    self._facts("in", "invalid").inc()

    def _up(self, up: bool) -> None:
        if up and not self.up:
            log.info("shared store reachable", extra={"fields": {"namespace": self.config.namespace}})
        self.up = up
        self._up_gauge.value = 1.0 if up else 0.0

    def _down(self, exc: BaseException) -> None:
        if self.up:
            reason = type(exc).__name__
            log.warning("shared store unreachable; serving from local state", extra={"fields": {"reason": reason}})
        self.up = False
        self._up_gauge.value = 0.0
