#!/usr/bin/env python3
"""Drives duet's OpenAI-compatible endpoints with the official `openai` Python package.

Run by scripts/openai_sdk.sh against a live duet whose simulated models are set up for one
scenario; every check raises (and the script exits non-zero) when anything is off:

  openai_sdk.py SCENARIO BASE_URL API_KEY ADMIN_TOKEN

  ok           Pro answers: models list, a whole answer, the same answer streamed (with
               usage), refused fields, a wrong key, an unknown model, the audit record.
  pro-fails    Pro times out before its first token: Flash's answer, whole and streamed.
  pro-cut      Pro times out in the middle of its answer: the stream raises the SDK's
               APIError after Pro's first words; a whole answer is Flash's.
  both-fail    Neither model answers in time: the SDK raises a 504 in OpenAI's error shape.
"""

import json
import sys
import urllib.request

import openai

MESSAGES = [
    {"role": "system", "content": "Answer in one paragraph."},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "Hello! What would you like to know?"},
    {"role": "user", "content": "Why is the sky blue?"},
]


def check(condition, what):
    if not condition:
        raise AssertionError(what)


def client(base, key):
    # No retries: a failure must show, not be papered over by a second run.
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)


def whole(c, **extra):
    """A non-streamed answer: (which model answered, run id, the completion)."""
    raw = c.chat.completions.with_raw_response.create(model="duet", messages=MESSAGES, **extra)
    completion = raw.parse()
    check(completion.object == "chat.completion", f"object: {completion.object}")
    check(completion.model == "duet", f"model: {completion.model}")
    check(len(completion.choices) == 1, "one choice")
    choice = completion.choices[0]
    check(choice.message.role == "assistant", "role")
    check(choice.message.content, "an answer")
    check(choice.finish_reason == "stop", f"finish_reason: {choice.finish_reason}")
    usage = completion.usage
    check(usage is not None, "usage")
    check(usage.prompt_tokens > 0 and usage.completion_tokens > 0, f"usage: {usage}")
    check(usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, "total_tokens")
    run_id = raw.headers.get("x-run-id")
    check(run_id, "X-Run-Id")
    check(completion.id == "chatcmpl-" + run_id.replace("-", ""), f"id: {completion.id}")
    return raw.headers.get("x-duet-answer"), run_id, completion


def streamed(c, include_usage=True):
    """A streamed answer: (which model answered, run id, text, usage chunk's usage)."""
    with c.chat.completions.with_streaming_response.create(
        model="duet",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": include_usage},
    ) as raw:
        answer = raw.headers.get("x-duet-answer")
        run_id = raw.headers.get("x-run-id")
        check(run_id, "X-Run-Id on a stream")
        text, usage, finish = [], None, None
        for chunk in raw.parse():
            check(chunk.object == "chat.completion.chunk", f"object: {chunk.object}")
            check(chunk.id == "chatcmpl-" + run_id.replace("-", ""), f"id: {chunk.id}")
            if chunk.usage is not None:
                check(chunk.choices == [], "the usage chunk has no choices")
                usage = chunk.usage
                continue
            check(len(chunk.choices) == 1, "one choice per chunk")
            delta = chunk.choices[0].delta
            if delta.content:
                check(finish is None, "no text after the finish")
                text.append(delta.content)
            if chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        check(finish == "stop", f"finish_reason: {finish}")
        if include_usage:
            check(usage is not None and usage.completion_tokens > 0, f"usage: {usage}")
        return answer, run_id, "".join(text), usage


def audited(base, token, run_id, status):
    """The run's audit record, from GET /runs/{run_id}; it is written off the response path,
    so it may take a moment."""
    import time

    for _ in range(100):
        req = urllib.request.Request(
            f"{base}/runs/{run_id}", headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                record = json.load(resp)
            if record.get("status") not in (None, "running"):
                check(record["status"] == status, f"run {run_id}: {record['status']}")
                return record
        except urllib.error.HTTPError as e:
            check(e.code == 404, f"GET /runs: {e.code}")
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} was never audited")


def expect_error(kind, call, **attrs):
    try:
        call()
    except kind as e:
        for name, want in attrs.items():
            check(getattr(e, name) == want, f"{kind.__name__}.{name}: {getattr(e, name)!r}")
        return e
    raise AssertionError(f"expected {kind.__name__}")


def scenario_ok(base, key, token):
    c = client(base, key)
    check([m.id for m in c.models.list()] == ["duet"], "models list")
    check(c.models.retrieve("duet").id == "duet", "models retrieve")

    answer, run_id, completion = whole(c, temperature=0.3, max_completion_tokens=500, user="sdk")
    check(answer == "pro", f"X-Duet-Answer: {answer}")
    text = completion.choices[0].message.content
    # The simulated Pro model opens this way; its answer depends only on the question.
    check(text.startswith("Considered answer on"), f"Pro's answer: {text[:60]!r}")
    record = audited(base, token, run_id, "ok")
    check(record["query"] == "Why is the sky blue?", f"audited query: {record['query']!r}")

    s_answer, s_run_id, s_text, s_usage = streamed(c)
    check(s_answer == "pro", f"stream X-Duet-Answer: {s_answer}")
    check(s_run_id != run_id, "every call is a run of its own")
    check(s_text == text, "the streamed answer is the same text")
    check(s_usage.completion_tokens == completion.usage.completion_tokens, "stream usage")
    audited(base, token, s_run_id, "ok")
    streamed(c, include_usage=False)

    create = c.chat.completions.create
    expect_error(openai.BadRequestError, lambda: create(model="duet", messages=MESSAGES, n=2),
                 param="n", code="unsupported_parameter", type="invalid_request_error")
    expect_error(openai.BadRequestError, lambda: create(
        model="duet", messages=MESSAGES,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        param="tools")
    expect_error(openai.BadRequestError, lambda: create(
        model="duet", messages=MESSAGES, response_format={"type": "json_object"}),
        param="response_format")
    expect_error(openai.BadRequestError, lambda: create(model="duet", messages=MESSAGES, logprobs=True),
                 param="logprobs")
    expect_error(openai.NotFoundError, lambda: create(model="gpt-4o", messages=MESSAGES),
                 code="model_not_found")
    expect_error(openai.AuthenticationError,
                 lambda: client(base, "wrong-key").chat.completions.create(model="duet", messages=MESSAGES),
                 code="unauthorized")


def scenario_pro_fails(base, key, token):
    c = client(base, key)
    answer, run_id, completion = whole(c)
    check(answer == "flash", f"X-Duet-Answer: {answer}")
    text = completion.choices[0].message.content
    check(text.startswith("Quick take on"), f"Flash's answer: {text[:60]!r}")
    record = audited(base, token, run_id, "partial")
    check(record["pro"]["outcome"] == "timeout", f"pro: {record['pro']['outcome']}")
    s_answer, s_run_id, s_text, _ = streamed(c)
    check(s_answer == "flash", f"stream X-Duet-Answer: {s_answer}")
    check(s_text == text, "the streamed answer is Flash's same text")
    audited(base, token, s_run_id, "partial")


def scenario_pro_cut(base, key, token):
    c = client(base, key)
    with c.chat.completions.with_streaming_response.create(
        model="duet", messages=MESSAGES, stream=True
    ) as raw:
        check(raw.headers.get("x-duet-answer") == "pro", "Pro started")
        run_id = raw.headers.get("x-run-id")
        text = []
        try:
            for chunk in raw.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    text.append(chunk.choices[0].delta.content)
        except openai.APIError as e:
            check("cut off" in e.message, f"error message: {e.message}")
        else:
            raise AssertionError("a stream cut short must raise")
    check("".join(text).startswith("Considered answer on"), f"Pro's first words: {text[:3]}")
    audited(base, token, run_id, "partial")
    answer, _, _ = whole(c)
    check(answer == "flash", f"a whole answer falls back to Flash: {answer}")


def scenario_both_fail(base, key, token):
    c = client(base, key)
    for stream in (False, True):
        e = expect_error(openai.InternalServerError,
                         lambda: c.chat.completions.create(model="duet", messages=MESSAGES, stream=stream),
                         status_code=504, code="timeout", type="server_error")
        run_id = e.response.headers.get("x-run-id")
        check(run_id, "X-Run-Id on the error")
        audited(base, token, run_id, "failed")


SCENARIOS = {
    "ok": scenario_ok,
    "pro-fails": scenario_pro_fails,
    "pro-cut": scenario_pro_cut,
    "both-fail": scenario_both_fail,
}

if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] not in SCENARIOS:
        sys.exit(__doc__)
    name, base, key, token = sys.argv[1:]
    SCENARIOS[name](base, key, token)
    print(f"openai {openai.__version__}: scenario {name} passed")
