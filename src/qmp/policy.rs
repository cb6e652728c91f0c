//! Interim allowlist until the `qmp` branch lands: read-only `query-*` only.
#[derive(Debug, thiserror::Error)]
#[error("QMP command {command:?} is refused: {reason}")]
pub struct Refusal {
    pub command: String,
    pub reason: String,
}
pub fn check(command: &str, _arguments: Option<&serde_json::Value>) -> Result<(), Refusal> {
    if command.starts_with("query-") {
        Ok(())
    } else {
        Err(Refusal { command: command.into(), reason: "not in the read-only allowlist".into() })
    }
}
