"""The official openai client against `slm serve`, unchanged: chat completions whole and
streamed, text completions, embeddings (base64, the client's default, and float) checked
against sentence-transformers, models.list, logprobs, and errors as the client's own
exception classes. Usage: openai_client.py BASE_URL API_KEY CHAT_MODEL EMBED_DIR"""
import sys

import numpy as np
import openai
from sentence_transformers import SentenceTransformer

base, key, chat_model, embed_dir = sys.argv[1:5]
embed_model = embed_dir.rstrip("/").split("/")[-1]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)

ids = [m.id for m in client.models.list()]
assert ids == [chat_model, embed_model], ids

messages = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name a large ocean."},
]
whole = client.chat.completions.create(
    model=chat_model, messages=messages, max_tokens=24, temperature=0
)
choice = whole.choices[0]
assert choice.message.role == "assistant"
assert choice.message.content, whole
assert choice.finish_reason in ("stop", "length"), choice.finish_reason
assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 10, whole.usage

pieces, usage, finish = [], None, None
stream = client.chat.completions.create(
    model=chat_model,
    messages=messages,
    max_tokens=24,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
streamed = "".join(pieces)
# Greedy: the stream says what the whole answer said, token for token.
assert streamed == choice.message.content, (streamed, choice.message.content)
assert finish == choice.finish_reason
assert usage.completion_tokens == whole.usage.completion_tokens, usage
assert usage.prompt_tokens == whole.usage.prompt_tokens

lp = client.chat.completions.create(
    model=chat_model,
    messages=messages,
    max_tokens=6,
    temperature=0,
    logprobs=True,
    top_logprobs=3,
)
content = lp.choices[0].logprobs.content
assert len(content) == lp.usage.completion_tokens, (len(content), lp.usage)
for t in content:
    assert len(t.top_logprobs) == 3
    # greedy: the chosen token is the most likely one
    assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-6, t
    assert t.logprob <= 0

text = client.completions.create(
    model=chat_model, prompt="The whale swam", max_tokens=8, temperature=0
)
assert text.choices[0].text and text.usage.completion_tokens == 8, text
streamed = "".join(
    c.choices[0].text
    for c in client.completions.create(
        model=chat_model, prompt="The whale swam", max_tokens=8, temperature=0, stream=True
    )
    if c.choices
)
assert streamed == text.choices[0].text, (streamed, text.choices[0].text)

sentences = [
    "The ship sailed into the storm.",
    "A whale surfaced beside the boat.",
    "Interest rates rose again this quarter, to the dismay of borrowers.",
    "短い文",
]
reference = SentenceTransformer(embed_dir, device="cpu").encode(sentences)
worst = 0.0
for fmt in (None, "float"):
    kwargs = {} if fmt is None else {"encoding_format": fmt}
    got = client.embeddings.create(model=embed_model, input=sentences, **kwargs)
    assert [d.index for d in got.data] == list(range(len(sentences)))
    for d, ref in zip(got.data, reference):
        v = np.asarray(d.embedding, dtype=np.float64)
        assert v.shape == ref.shape, (v.shape, ref.shape)
        cos = float(v @ ref / (np.linalg.norm(v) * np.linalg.norm(ref)))
        worst = max(worst, 1.0 - cos)
assert worst <= 1e-5, worst
print(f"embeddings: worst 1 - cosine {worst:.3g}")

import json

schema = {
    "type": "object",
    "properties": {
        "ocean": {"type": "string"},
        "deep": {"type": "boolean"},
        "depth_m": {"type": "integer"},
    },
    "required": ["ocean", "deep", "depth_m"],
    "additionalProperties": False,
}
for seed in range(3):
    out = client.chat.completions.create(
        model=chat_model,
        messages=messages,
        temperature=1.0,
        seed=seed,
        max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "ocean", "schema": schema, "strict": True}},
    )
    if out.choices[0].finish_reason == "length":
        continue
    doc = json.loads(out.choices[0].message.content)
    assert list(doc) == ["ocean", "deep", "depth_m"], doc
    assert isinstance(doc["ocean"], str) and isinstance(doc["deep"], bool), doc
    assert isinstance(doc["depth_m"], int) and not isinstance(doc["depth_m"], bool), doc
obj = client.chat.completions.create(
    model=chat_model, messages=messages, max_tokens=120, temperature=0,
    response_format={"type": "json_object"},
)
if obj.choices[0].finish_reason == "stop":
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
try:
    client.chat.completions.create(
        model=chat_model, messages=messages,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "a+"}}},
    )
    raise AssertionError("an unsupported schema keyword was accepted")
except openai.BadRequestError as e:
    assert "pattern" in str(e)

for bad, field in (
    ({"input": [101, 102]}, "token ids"),
    ({"input": "x", "dimensions": 7}, "dimensions"),
    ({"input": ["x"] * 2049}, "2049 inputs"),
):
    try:
        client.embeddings.create(model=embed_model, **bad)
        raise AssertionError(f"embeddings accepted {field}")
    except openai.BadRequestError as e:
        assert field in str(e), e

try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise AssertionError("an unknown model was served")
except openai.NotFoundError as e:
    assert "no-such-model" in str(e)
try:
    client.chat.completions.create(model=chat_model, messages=messages, max_tokens=-3)
    raise AssertionError("max_tokens -3 was accepted")
except openai.BadRequestError as e:
    assert "max_tokens" in str(e)
try:
    openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError:
    pass
print("openai client: ok")
