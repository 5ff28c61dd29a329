"""Streams one duet run and prints what arrives: a small, complete SSE client.

    python3 docs/examples/stream.py "Why is the sky blue?"

DUET_URL (default http://127.0.0.1:8080) and DUET_API_KEY (when the service has API_KEYS)
come from the environment. Needs `requests`.
"""

import json
import os
import sys

import requests


def sse_events(response):
    """Yields (event, id, data) for each event of a text/event-stream response.

    Follows the SSE rules: lines end with LF, CR or CRLF; a blank line ends an event; lines
    starting with ':' are comments (duet's keep-alives); several data lines join with '\\n'.
    Lines are split on bytes, not with str.splitlines(), which would also split on U+2028 and
    other characters that JSON leaves unescaped inside strings.
    """
    event, data, last_id = "", [], ""
    buffer = b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        while True:
            cut = min((i for i in (buffer.find(b"\n"), buffer.find(b"\r")) if i >= 0), default=-1)
            # A CR at the very end may be the first half of a CRLF: wait for more.
            if cut < 0 or (buffer[cut:cut + 1] == b"\r" and cut + 1 == len(buffer)):
                break
            line = buffer[:cut].decode("utf-8")
            step = 2 if buffer[cut:cut + 2] == b"\r\n" else 1
            buffer = buffer[cut + step:]
            if line == "":
                if data:
                    yield event or "message", last_id, "\n".join(data)
                event, data = "", []
            elif line.startswith(":"):
                continue
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    event = value
                elif name == "data":
                    data.append(value)
                elif name == "id":
                    last_id = value


def main():
    url = os.environ.get("DUET_URL", "http://127.0.0.1:8080")
    headers = {"Accept": "text/event-stream"}
    if key := os.environ.get("DUET_API_KEY"):
        headers["Authorization"] = f"Bearer {key}"
    body = {"query": sys.argv[1] if len(sys.argv) > 1 else "Why is the sky blue?"}

    with requests.post(f"{url}/query/stream", json=body, headers=headers, stream=True,
                       timeout=(5, 60)) as response:
        if response.status_code != 200:
            # Refused before the run started: a JSON error, no stream.
            error = response.json()["error"]
            sys.exit(f"{response.status_code} {error['type']}: {error['message']}")
        print("run", response.headers["X-Run-Id"])
        for event, event_id, data in sse_events(response):
            payload = json.loads(data)
            if event in ("flash", "pro"):
                print(f"{event} ({payload['latency_ms']} ms): {payload['text'][:60]}...")
            elif event == "error":
                print(f"error from {payload['model']}: {payload['error_type']}: {payload['message']}")
            elif event == "done":
                print(f"done: {payload['status']} (flash {payload['flash']}, "
                      f"pro {payload['pro']}) in {payload['total_ms']} ms; last id {event_id}")
                return
            else:
                print(event)
        # The connection ended without `done`: reconnect with Last-Event-ID to get the rest.
        sys.exit("stream ended before done")


if __name__ == "__main__":
    main()
