import openai
from tests.conftest import openai_config

async def test_smoke(fake, keymux):
    km = await keymux(openai_config(fake.url, {"a": "sk-aaaaaaaaaaaa", "b": "sk-bbbbbbbbbbbb"}))
    client = openai.AsyncOpenAI(base_url=km.url + "/v1", api_key="unused", max_retries=0)
    r = await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content
    stream = await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert len(chunks) > 3
    print(await km.metrics())
    await client.close()
