"""Gemini's per-day quota, end to end: the key rests for that model until Pacific midnight."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from sidecar.classify import seconds_to_quota_reset
from sidecar.health import HealthSettings
from tests.conftest import provider_config

KEYS = {"a": "AIza-key-a-0000000000", "b": "AIza-key-b-1111111111"}
NAMES = {secret: name for name, secret in KEYS.items()}
FLASH, PRO = "gemini-2.0-flash", "gemini-2.5-pro"
HI = {"contents": [{"parts": [{"text": "hi"}]}]}
OUT_FOR_THE_DAY = {
    "error": {
        "code": 429,
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "status": "RESOURCE_EXHAUSTED",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [
                    {
                        "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                        "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                        "quotaDimensions": {"location": "global", "model": FLASH},
                        "quotaValue": "200",
                    }
                ],
            },
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"},
        ],
    }
}


def rest_ends(now_wall: float) -> float:
    """When a per-day quota hit at `now_wall` lets the key back in, as keymux computes it."""
    return now_wall + min(seconds_to_quota_reset(now_wall), HealthSettings().quota_window_max)


async def test_a_key_out_of_its_daily_gemini_quota_rests_for_that_model_until_pacific_midnight(fake, keymux):
    fake.provider.script(key=KEYS["a"], model=FLASH, status=429, body=OUT_FOR_THE_DAY)
    km = await keymux(provider_config("gemini", fake.url, KEYS))

    async def generate(model: str) -> None:
        async with km.session.post(f"{km.url}/v1beta/models/{model}:generateContent", json=HI) as r:
            assert r.status == 200, await r.text()

    def used() -> list[tuple[str, str | None]]:
        return [(NAMES[s.key], s.model) for s in fake.provider.seen]

    before = time.time()
    await generate(FLASH)  # a answers 429, b serves it
    after = time.time()
    assert used() == [("a", FLASH), ("b", FLASH)]

    for _ in range(6):
        await generate(FLASH)
    assert used()[2:] == [("b", FLASH)] * 6  # a is never asked for flash again

    for _ in range(4):
        await generate(PRO)
    assert used()[8:] == [("a", PRO), ("b", PRO), ("a", PRO), ("b", PRO)]  # a still serves pro

    async with km.session.get(km.admin + "/keys") as r:
        rows = {(row["key"], row["model"]): row for row in (await r.json())["keys"]}
    assert rows[("a", "*")]["state"] == "usable"
    resting = rows[("a", FLASH)]
    assert (resting["state"], resting["last_failure"]) == ("cooling", "rate_limited")
    until = datetime.strptime(resting["until"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    assert rest_ends(before) - 2 <= until <= rest_ends(after) + 1  # /keys shows whole seconds
    if seconds_to_quota_reset(after) > 3600 + 60:  # the daily path, not a capped rate-limit hint
        assert until - after > HealthSettings().rate_limit_cooldown_max
