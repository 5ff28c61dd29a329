//! A streamed answer of the mock, written as it is polled: no task, one timer re-armed per
//! token, one reused buffer, each family's bytes as its fixtures have them.

use std::{
    convert::Infallible,
    fmt::Write as _,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::body::Bytes;
use bytes::{BufMut, BytesMut};
use futures::Stream;
use tokio::time::Sleep;

use super::{
    ANTHROPIC_ID, CREATED, GEMINI_RESPONSE_ID, HOLD_MAX, OPENAI_ID, WORDS, WORDS_JSON,
    answer::{Family, Plan},
};

#[derive(Debug, Clone, Copy)]
enum Stage {
    Preamble,
    Token(usize),
    Final,
    Hold,
    End,
}

/// A streamed answer, produced as it is polled: no task, one timer re-armed per token.
pub(super) struct MockBody {
    plan: Arc<Plan>,
    stage: Stage,
    sleep: Pin<Box<Sleep>>,
    waiting: bool,
    buf: BytesMut,
}

impl MockBody {
    pub(super) fn new(plan: Plan) -> Self {
        MockBody {
            plan: Arc::new(plan),
            stage: Stage::Preamble,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            waiting: false,
            buf: BytesMut::with_capacity(1024),
        }
    }

    fn wait(&mut self, d: Duration) {
        if !d.is_zero() {
            self.sleep.as_mut().reset(tokio::time::Instant::now() + d);
            self.waiting = true;
        }
    }

    /// The bytes written so far, as one frame; the buffer's memory is reused once the frame
    /// has been written out.
    fn take(&mut self) -> Bytes {
        self.buf.split().freeze()
    }

    fn next_stage(&mut self) -> Option<Bytes> {
        let plan = Arc::clone(&self.plan);
        let d = &plan.d;
        match self.stage {
            Stage::Preamble => {
                preamble(&plan, &mut self.buf);
                self.stage = Stage::Token(0);
                self.wait(plan.ttft);
            }
            Stage::Token(k) => {
                if d.stall_after == Some(k) {
                    self.stage = Stage::Hold;
                    return None;
                }
                if d.truncate && k == plan.tokens / 2 {
                    self.stage = Stage::End;
                    return None;
                }
                if d.midstream_error && k == 2.min(plan.tokens - 1) {
                    midstream_error(&plan, &mut self.buf);
                    self.stage = Stage::End;
                    return Some(self.take());
                }
                let last = !d.endless && k + 1 >= plan.tokens;
                token(&plan, k, last, &mut self.buf);
                if d.malformed && k == 0 {
                    malformed(plan.family, &mut self.buf);
                }
                self.stage = match (last, plan.family) {
                    (true, Family::Gemini) if d.no_done => Stage::Hold,
                    (true, Family::Gemini) => Stage::End,
                    (true, _) => Stage::Final,
                    (false, _) => Stage::Token(k + 1),
                };
                if !last {
                    self.wait(plan.token_interval);
                }
            }
            Stage::Final => {
                finale(&plan, &mut self.buf);
                self.stage = if d.no_done { Stage::Hold } else { Stage::End };
            }
            Stage::Hold => {
                self.wait(HOLD_MAX);
                self.stage = Stage::End;
                return None;
            }
            Stage::End => return None,
        }
        (!self.buf.is_empty()).then(|| self.take())
    }
}

impl Stream for MockBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.waiting {
                match this.sleep.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) => this.waiting = false,
                }
            }
            if matches!(this.stage, Stage::End) {
                return Poll::Ready(None);
            }
            if let Some(frame) = this.next_stage() {
                return Poll::Ready(Some(Ok(frame)));
            }
        }
    }
}

/// What goes out before the first token: OpenAI's role chunk; Anthropic's message_start,
/// content_block_start and a ping; nothing for Gemini.
fn preamble(plan: &Plan, buf: &mut BytesMut) {
    let m = &plan.model;
    let p = plan.input_tokens;
    match plan.family {
        Family::Gemini => {}
        Family::OpenAi => {
            let _ = write!(
                Writer(buf),
                "data: {{\"id\":\"{OPENAI_ID}\",\"object\":\"chat.completion.chunk\",\"created\":{CREATED},\"model\":{m},\"service_tier\":\"default\",\"system_fingerprint\":\"fp_mockduet\",\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
            );
        }
        Family::Anthropic => {
            let _ = write!(
                Writer(buf),
                "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"model\":{m},\"id\":\"{ANTHROPIC_ID}\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{{\"input_tokens\":{p},\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"cache_creation\":{{\"ephemeral_5m_input_tokens\":0,\"ephemeral_1h_input_tokens\":0}},\"output_tokens\":1,\"service_tier\":\"standard\"}}}}}}\n\n\
                 event: content_block_start\ndata: {{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{{\"type\":\"text\",\"text\":\"\"}}}}\n\n\
                 event: ping\ndata: {{\"type\": \"ping\"}}\n\n"
            );
        }
    }
}

/// Token `k`; for Gemini the last token's chunk also carries the finish reason.
fn token(plan: &Plan, k: usize, last: bool, buf: &mut BytesMut) {
    let w = &WORDS_JSON[k % WORDS.len()];
    let m = &plan.model;
    match plan.family {
        Family::Gemini => {
            let p = plan.input_tokens;
            let n = k + 1;
            let finish = if last {
                "\"finishReason\": \"STOP\","
            } else {
                ""
            };
            let _ = write!(
                Writer(buf),
                "data: {{\"candidates\": [{{\"content\": {{\"parts\": [{{\"text\": {w}}}],\"role\": \"model\"}},{finish}\"index\": 0}}],\"usageMetadata\": {{\"promptTokenCount\": {p},\"candidatesTokenCount\": {n},\"totalTokenCount\": {t},\"promptTokensDetails\": [{{\"modality\": \"TEXT\",\"tokenCount\": {p}}}]}},\"modelVersion\": {m},\"responseId\": \"{GEMINI_RESPONSE_ID}\"}}\r\n\r\n",
                t = p + n
            );
        }
        Family::OpenAi => {
            let _ = write!(
                Writer(buf),
                "data: {{\"id\":\"{OPENAI_ID}\",\"object\":\"chat.completion.chunk\",\"created\":{CREATED},\"model\":{m},\"service_tier\":\"default\",\"system_fingerprint\":\"fp_mockduet\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{w}}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
            );
        }
        Family::Anthropic => {
            let _ = write!(
                Writer(buf),
                "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":{w}}}}}\n\n"
            );
        }
    }
}

/// After the last token: OpenAI's finish chunk, usage chunk and `[DONE]`; Anthropic's
/// content_block_stop, message_delta and message_stop.
fn finale(plan: &Plan, buf: &mut BytesMut) {
    let m = &plan.model;
    let (p, n) = (plan.input_tokens, plan.tokens);
    match plan.family {
        Family::Gemini => {}
        Family::OpenAi => {
            let _ = write!(
                Writer(buf),
                "data: {{\"id\":\"{OPENAI_ID}\",\"object\":\"chat.completion.chunk\",\"created\":{CREATED},\"model\":{m},\"service_tier\":\"default\",\"system_fingerprint\":\"fp_mockduet\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"stop\"}}],\"usage\":null}}\n\n\
                 data: {{\"id\":\"{OPENAI_ID}\",\"object\":\"chat.completion.chunk\",\"created\":{CREATED},\"model\":{m},\"service_tier\":\"default\",\"system_fingerprint\":\"fp_mockduet\",\"choices\":[],\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{n},\"total_tokens\":{t},\"prompt_tokens_details\":{{\"cached_tokens\":0,\"audio_tokens\":0}},\"completion_tokens_details\":{{\"reasoning_tokens\":0,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}}}}}\n\n",
                t = p + n
            );
            if !plan.d.no_done {
                buf.put_slice(b"data: [DONE]\n\n");
            }
        }
        Family::Anthropic => {
            let _ = write!(
                Writer(buf),
                "event: content_block_stop\ndata: {{\"type\":\"content_block_stop\",\"index\":0}}\n\n\
                 event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\",\"stop_sequence\":null}},\"usage\":{{\"input_tokens\":{p},\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":{n}}}}}\n\n\
                 event: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n"
            );
        }
    }
}

fn midstream_error(plan: &Plan, buf: &mut BytesMut) {
    buf.put_slice(match plan.family {
        Family::Gemini => {
            b"data: {\"error\": {\"code\": 503,\"message\": \"The model is overloaded. Please try again later.\",\"status\": \"UNAVAILABLE\"}}\r\n\r\n".as_slice()
        }
        Family::OpenAi => {
            b"data: {\"error\":{\"message\":\"The server had an error while processing your request. Sorry about that!\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\ndata: [DONE]\n\n".as_slice()
        }
        Family::Anthropic => {
            b"event: error\ndata: {\"type\":\"error\",\"error\":{\"details\":null,\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n".as_slice()
        }
    });
}

fn malformed(family: Family, buf: &mut BytesMut) {
    buf.put_slice(match family {
        Family::Gemini => b"data: {\"candidates\": [{\"content\": \r\n\r\n".as_slice(),
        Family::OpenAi => b"data: {\"id\":\"chatcmpl-mock\",\"choices\":[{\"delta\":\n\n".as_slice(),
        Family::Anthropic => {
            b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_de\n\n".as_slice()
        }
    });
}

/// `fmt::Write` into a `BytesMut`, so `write!` fills the reusable buffer directly.
struct Writer<'a>(&'a mut BytesMut);

impl std::fmt::Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.put_slice(s.as_bytes());
        Ok(())
    }
}
