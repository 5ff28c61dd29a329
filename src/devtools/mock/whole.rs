//! Whole answers (a non-streaming request) and the families' error bodies, shaped like the
//! fixtures in `tests/fixtures/wire`.

use super::{
    ANTHROPIC_ID, CREATED, GEMINI_RESPONSE_ID, OPENAI_ID,
    answer::{Family, Plan},
    json_str,
};

pub(super) fn gemini_whole(plan: &Plan) -> String {
    let text = json_str(&plan.output_text());
    let (m, p, n) = (&plan.model, plan.input_tokens, plan.tokens);
    format!(
        "{{\n  \"candidates\": [\n    {{\n      \"content\": {{\n        \"parts\": [\n          {{\n            \"text\": {text}\n          }}\n        ],\n        \"role\": \"model\"\n      }},\n      \"finishReason\": \"STOP\",\n      \"index\": 0\n    }}\n  ],\n  \"usageMetadata\": {{\n    \"promptTokenCount\": {p},\n    \"candidatesTokenCount\": {n},\n    \"totalTokenCount\": {t},\n    \"promptTokensDetails\": [\n      {{\n        \"modality\": \"TEXT\",\n        \"tokenCount\": {p}\n      }}\n    ]\n  }},\n  \"modelVersion\": {m},\n  \"responseId\": \"{GEMINI_RESPONSE_ID}\"\n}}\n",
        t = p + n
    )
}

pub(super) fn openai_whole(plan: &Plan) -> String {
    let text = json_str(&plan.output_text());
    let (m, p, n) = (&plan.model, plan.input_tokens, plan.tokens);
    format!(
        "{{\n  \"id\": \"{OPENAI_ID}\",\n  \"object\": \"chat.completion\",\n  \"created\": {CREATED},\n  \"model\": {m},\n  \"choices\": [\n    {{\n      \"index\": 0,\n      \"message\": {{\n        \"role\": \"assistant\",\n        \"content\": {text},\n        \"refusal\": null,\n        \"annotations\": []\n      }},\n      \"logprobs\": null,\n      \"finish_reason\": \"stop\"\n    }}\n  ],\n  \"usage\": {{\n    \"prompt_tokens\": {p},\n    \"completion_tokens\": {n},\n    \"total_tokens\": {t}\n  }},\n  \"service_tier\": \"default\",\n  \"system_fingerprint\": \"fp_mockduet\"\n}}\n",
        t = p + n
    )
}

pub(super) fn anthropic_whole(plan: &Plan) -> String {
    let text = json_str(&plan.output_text());
    let (m, p, n) = (&plan.model, plan.input_tokens, plan.tokens);
    format!(
        "{{\"model\":{m},\"id\":\"{ANTHROPIC_ID}\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[{{\"type\":\"text\",\"text\":{text}}}],\"stop_reason\":\"end_turn\",\"stop_sequence\":null,\"usage\":{{\"input_tokens\":{p},\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":{n},\"service_tier\":\"standard\"}}}}"
    )
}

pub(super) fn gemini_error(code: u16, status: &str, message: &str) -> String {
    format!(
        "{{\n  \"error\": {{\n    \"code\": {code},\n    \"message\": {},\n    \"status\": \"{status}\"\n  }}\n}}\n",
        json_str(message)
    )
}

fn openai_error(message: &str, kind: &str, code: &str) -> String {
    format!(
        "{{\n    \"error\": {{\n        \"message\": {},\n        \"type\": \"{kind}\",\n        \"param\": null,\n        \"code\": {code}\n    }}\n}}\n",
        json_str(message)
    )
}

fn anthropic_error(kind: &str, message: &str) -> String {
    format!(
        "{{\"type\":\"error\",\"error\":{{\"type\":\"{kind}\",\"message\":{}}},\"request_id\":\"req_011MockDuet0000000000000\"}}",
        json_str(message)
    )
}

/// The family's error body for an HTTP status, shaped like the fixtures.
pub(super) fn error_body(family: Family, status: u16) -> String {
    match family {
        Family::Gemini => {
            let (s, msg) = match status {
                400 => {
                    return "{\n  \"error\": {\n    \"code\": 400,\n    \"message\": \"API key not valid. Please pass a valid API key.\",\n    \"status\": \"INVALID_ARGUMENT\",\n    \"details\": [\n      {\n        \"@type\": \"type.googleapis.com/google.rpc.ErrorInfo\",\n        \"reason\": \"API_KEY_INVALID\",\n        \"domain\": \"googleapis.com\",\n        \"metadata\": {\n          \"service\": \"generativelanguage.googleapis.com\"\n        }\n      }\n    ]\n  }\n}\n".to_owned();
                }
                403 => ("PERMISSION_DENIED", "Permission denied."),
                404 => ("NOT_FOUND", "Model not found."),
                429 => {
                    return "{\n  \"error\": {\n    \"code\": 429,\n    \"message\": \"You exceeded your current quota, please check your plan and billing details.\",\n    \"status\": \"RESOURCE_EXHAUSTED\",\n    \"details\": [\n      {\n        \"@type\": \"type.googleapis.com/google.rpc.RetryInfo\",\n        \"retryDelay\": \"1s\"\n      }\n    ]\n  }\n}\n".to_owned();
                }
                500 => ("INTERNAL", "An internal error has occurred."),
                503 => (
                    "UNAVAILABLE",
                    "The model is overloaded. Please try again later.",
                ),
                504 => ("DEADLINE_EXCEEDED", "Deadline exceeded."),
                _ => ("UNKNOWN", "Mock error."),
            };
            gemini_error(status, s, msg)
        }
        Family::OpenAi => match status {
            400 => openai_error(
                "This model's maximum context length is 128000 tokens.",
                "invalid_request_error",
                "\"context_length_exceeded\"",
            ),
            401 => openai_error(
                "Incorrect API key provided.",
                "invalid_request_error",
                "\"invalid_api_key\"",
            ),
            429 => openai_error(
                "Rate limit reached for requests. Please try again in 1s.",
                "requests",
                "\"rate_limit_exceeded\"",
            ),
            503 => openai_error(
                "Our servers are currently overloaded. Please try again later.",
                "service_unavailable_error",
                "\"server_is_overloaded\"",
            ),
            s if s >= 500 => openai_error("The server had an error.", "server_error", "null"),
            _ => openai_error("Mock error.", "invalid_request_error", "null"),
        },
        Family::Anthropic => match status {
            400 => anthropic_error("invalid_request_error", "prompt is too long"),
            401 => anthropic_error("authentication_error", "invalid x-api-key"),
            403 => anthropic_error("permission_error", "Permission denied."),
            404 => anthropic_error("not_found_error", "Not found."),
            429 => anthropic_error(
                "rate_limit_error",
                "This request would exceed the rate limit.",
            ),
            529 => anthropic_error("overloaded_error", "Overloaded"),
            s if s >= 500 => anthropic_error("api_error", "Internal server error"),
            _ => anthropic_error("invalid_request_error", "Mock error."),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devtools::mock::MockConfig;

    #[test]
    fn error_bodies_parse_as_faults() {
        use crate::providers::http::Fault;
        for family in [Family::Gemini, Family::OpenAi, Family::Anthropic] {
            for status in [400, 401, 404, 429, 500, 503, 529] {
                let body = error_body(family, status);
                assert!(
                    Fault::from_bytes(body.as_bytes()).is_some(),
                    "{family:?} {status}: {body}"
                );
            }
        }
    }

    #[test]
    fn whole_bodies_are_json() {
        for family in [Family::Gemini, Family::OpenAi, Family::Anthropic] {
            let plan = Plan::new(family, "m\"odel", b"{}", &MockConfig::default());
            for body in [
                gemini_whole(&plan),
                openai_whole(&plan),
                anthropic_whole(&plan),
            ] {
                serde_json::from_str::<serde_json::Value>(&body).unwrap();
            }
        }
    }
}
