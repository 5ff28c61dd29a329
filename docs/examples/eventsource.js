// GET /query/stream with EventSource: for pages served by duet (or allowed by
// CORS_ALLOWED_ORIGINS) when the service has no API_KEYS, since EventSource cannot send headers.
const params = new URLSearchParams({ q: 'Why is the sky blue?', deltas: '1' });
const source = new EventSource(`/query/stream?${params}`);
const answers = { flash: '', pro: '' };
let deltas = 0;

source.addEventListener('start', (e) => console.log('run', JSON.parse(e.data).run_id));
source.addEventListener('delta', (e) => {
  const d = JSON.parse(e.data);
  answers[d.model] += d.text; // show the text as it grows
  deltas += 1;
});
for (const model of ['flash', 'pro']) {
  source.addEventListener(model, (e) => {
    const d = JSON.parse(e.data);
    answers[model] = d.text; // the whole answer replaces the deltas
    console.log(model, `${d.latency_ms} ms`, `${d.usage.output_tokens} tokens`, `(${deltas} deltas so far)`);
  });
}
source.addEventListener('error', (e) => {
  if (e.data) {
    // The service's own `error` event: it carries data.
    const d = JSON.parse(e.data);
    console.log('error event', d.model, d.error_type, d.message);
  } else if (source.readyState === EventSource.CLOSED) {
    // Refused (a 4xx/5xx with a JSON body) or a 204 after a resume: the browser gave up.
    console.log('connection closed by the browser');
  } else {
    // The connection dropped: the browser reconnects by itself with Last-Event-ID.
    console.log('connection lost; reconnecting');
  }
});
source.addEventListener('done', (e) => {
  const d = JSON.parse(e.data);
  console.log('done', d.status, `flash ${d.flash}`, `pro ${d.pro}`, `${d.total_ms} ms`);
  source.close(); // otherwise the browser would reconnect when the server ends the stream
});
