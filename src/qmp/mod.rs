//! Interim: the agreed API of the QMP client; the implementation lands from the `qmp` branch.
pub mod policy;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

#[derive(Debug, Clone)]
pub struct QmpConfig {
    pub connect_budget: Duration,
    pub greeting_timeout: Duration,
    pub capabilities_timeout: Duration,
    pub reply_cap: usize,
    pub max_events: usize,
}
impl Default for QmpConfig {
    fn default() -> Self {
        QmpConfig {
            connect_budget: Duration::from_secs(10),
            greeting_timeout: Duration::from_millis(1500),
            capabilities_timeout: Duration::from_secs(3),
            reply_cap: 8 << 20,
            max_events: 1000,
        }
    }
}
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("timeout on {command} after {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("closed")]
    Closed,
    #[error("reply too large ({limit})")]
    ReplyTooLarge { limit: usize },
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("not implemented yet")]
    Unimplemented,
}
impl QmpError {
    pub fn classify(&self) -> &'static str {
        "interim"
    }
}
pub struct Reply {
    pub raw: Vec<u8>,
    pub value: Value,
    pub elapsed: Duration,
}
pub struct QmpClient;
impl QmpClient {
    pub async fn connect(_path: &Path, _cfg: &QmpConfig) -> Result<QmpClient, QmpError> {
        Err(QmpError::Unimplemented)
    }
    pub async fn execute(&mut self, _c: &str, _a: Option<Value>, _t: Duration) -> Result<Reply, QmpError> {
        Err(QmpError::Unimplemented)
    }
    pub fn greeting(&self) -> Option<&Value> {
        None
    }
    pub fn events(&self) -> &[Value] {
        &[]
    }
    pub fn transcript_jsonl(&self) -> Vec<u8> {
        Vec::new()
    }
}
