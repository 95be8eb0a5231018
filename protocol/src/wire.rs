//! The bodies of the inference API (HTTP and MQTT carry the same ones) and the JSON form of a
//! labelled sample on the ingest topic. The daemon decodes and encodes with these types, and its
//! CLI, demo and tests read them back with the same ones.
//!
//! Requests and samples may also come as safetensors bytes or as an image file; those forms are
//! self-describing and decoded against the bundle's manifest in the daemon.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A tensor as people write it in JSON: `{"shape": [1, 1, 8, 8], "data": [0.0, ...]}`. Numbers
/// stay JSON numbers until the bundle says which dtype they must be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonTensor {
    pub shape: Vec<usize>,
    pub data: Vec<serde_json::Number>,
}

/// An inference request: `{"text": ["..."]}` for text bundles, or
/// `{"inputs": {"<input name>": {"shape": [...], "data": [...]}}}` for tensors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<BTreeMap<String, JsonTensor>>,
}

/// One row's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionBody {
    pub label: String,
    pub class_index: usize,
    /// Softmax score per label.
    pub scores: BTreeMap<String, f32>,
    /// `task@vN` of the adapter that answered (v0: the base model).
    pub adapter: String,
    pub adapter_version: u64,
    /// Present (true) when a routed adapter answered this row with the base model.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub base_routed: bool,
}

/// `{"predictions": [...]}`, a row each, in request order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PredictResponse {
    pub predictions: Vec<PredictionBody>,
}

/// `{"error": {"type": "...", "message": "..."}}`: a stable label for metrics and scripts, and
/// what was wrong and where for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    #[serde(rename = "type")]
    pub error_type: String,
    pub message: String,
}

impl ErrorBody {
    pub fn new(error_type: &str, message: &str) -> ErrorBody {
        ErrorBody { error: ErrorDetail { error_type: error_type.to_string(), message: message.to_string() } }
    }
}

/// A labelled sample in JSON, for people (`mosquitto_pub -m '{...}'`):
///
/// ```json
/// {"key": "robot-7:1042", "task": "sorter", "label": "left",
///  "input": {"shape": [1, 1, 8, 8], "data": [0.0, ...]},
///  "timestamp_ms": 1700000000000, "source": "robot-7", "weight": 1.0, "correction": false}
/// ```
///
/// with `"text"` instead of `"input"` for text bundles, or `"image"` (base64 of a JPEG or PNG
/// file) for image bundles. The label is a string or an integer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleMessage {
    pub key: String,
    pub task: String,
    pub label: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<JsonTensor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f32>,
    #[serde(default)]
    pub correction: bool,
    /// The label request this sample answers ([`LabelRequest::id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// The string metadata a sample in safetensors form may carry (the same fields as
/// [`SampleMessage`]; `text` for text bundles, with no tensor).
pub const SAMPLE_METADATA: [&str; 9] = ["key", "task", "label", "timestamp_ms", "source", "weight", "correction", "text", "request_id"];

/// A request for the label of an input the device served, published on
/// `{prefix}/{device}/label_requests/{task}` (QoS 1, not retained). The answer is an ordinary
/// sample on the task's samples topic carrying `request_id`, with the input copied from here
/// (`input`, `text` or `image`, as a sample takes it), or fetched from `input_url` when the input
/// was too large to go inline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelRequest {
    pub id: String,
    pub task: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<JsonTensor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Base64 of a PNG of the image as the bundle fits it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Where to fetch the input over the daemon's HTTP API (with its control token) when it is
    /// not inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_url: Option<String>,
    /// What serving answered for it, and how sure it was (the top score).
    pub predicted: String,
    pub confidence: f32,
    /// Why it was picked: `uncertainty`, `novelty`, `balance` or `random`.
    pub strategy: String,
    /// After this the daemon forgets the request (an answer still counts as a sample).
    pub expires_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_read_back_as_written_and_unknown_fields_are_refused() {
        let response = PredictResponse {
            predictions: vec![PredictionBody {
                label: "left".into(),
                class_index: 0,
                scores: [("left".to_string(), 0.75), ("right".to_string(), 0.25)].into(),
                adapter: "sorter@v2".into(),
                adapter_version: 2,
                base_routed: false,
            }],
        };
        let json = serde_json::to_string(&response).unwrap();
        assert!(!json.contains("base_routed"), "only said when true: {json}");
        assert_eq!(serde_json::from_str::<PredictResponse>(&json).unwrap(), response);
        let error = serde_json::to_value(ErrorBody::new("bad_input", "shape [2] does not fit")).unwrap();
        assert_eq!(error["error"]["type"], "bad_input");
        let err = serde_json::from_str::<PredictRequest>(r#"{"txt": ["hi"]}"#).unwrap_err().to_string();
        assert!(err.contains("txt"), "{err}");
        let err = serde_json::from_str::<SampleMessage>(r#"{"key": "k", "task": "t", "label": 1, "lable": 2}"#).unwrap_err().to_string();
        assert!(err.contains("lable"), "{err}");
    }
}
