// POST /query/stream with fetch: sends an Authorization header (needed when the service has
// API_KEYS; keys never go in URLs) and reads the event stream from the response body.

/** Calls onEvent(name, data, id) for each event; resolves with the last event id. */
async function streamQuery(body, { apiKey, lastEventId, onEvent, signal } = {}) {
  const headers = { 'Content-Type': 'application/json', Accept: 'text/event-stream' };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  if (lastEventId) headers['Last-Event-ID'] = lastEventId; // resume instead of a new run
  const response = await fetch('/query/stream', {
    method: 'POST', headers, body: JSON.stringify(body), signal,
  });
  if (response.status === 204) return lastEventId; // resumed, nothing was left
  if (!response.ok) {
    // Refused before the run started: a JSON error and no stream.
    const { error } = await response.json();
    throw new Error(`${response.status} ${error.type}: ${error.message}`);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let event = '';
  let data = [];
  let id = lastEventId ?? '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return id; // ended without `done`? reconnect with this id
    buffer += value;
    // Lines end with LF, CR or CRLF; a CR at the end may be half of a CRLF, so keep it.
    const cut = buffer.endsWith('\r') ? buffer.length - 1 : buffer.length;
    const lines = buffer.slice(0, cut).split(/\r\n|\r|\n/);
    buffer = lines.pop() + buffer.slice(cut);
    for (const line of lines) {
      if (line === '') { // a blank line ends the event
        if (data.length) onEvent(event || 'message', JSON.parse(data.join('\n')), id);
        if (event === 'done') { reader.cancel(); return id; }
        event = '';
        data = [];
      } else if (!line.startsWith(':')) { // ':' lines are keep-alive comments
        const colon = line.indexOf(':');
        const name = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? '' : line.slice(colon + 1);
        if (value.startsWith(' ')) value = value.slice(1);
        if (name === 'event') event = value;
        else if (name === 'data') data.push(value);
        else if (name === 'id') id = value;
      }
    }
  }
}

streamQuery({ query: 'Why is the sky blue?' }, {
  apiKey: 'key-1',
  onEvent(name, data, id) {
    if (name === 'flash' || name === 'pro') console.log(name, id, data.text.slice(0, 40));
    else if (name === 'error') console.log('error event', data.model, data.error_type, data.message);
    else if (name === 'done') console.log('done', id, data.status);
    else console.log(name, id);
  },
}).then((id) => console.log('finished at', id), (e) => console.log('refused:', e.message));
