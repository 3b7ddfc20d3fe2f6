//! `log`: one `tracing` event per frame at debug level, with the connection id, direction,
//! opcode, length and the first bytes. `log:N` shows N leading bytes (default 32); `log:0`
//! (or `log:redact`) shows none, for routes that carry secrets.

use tracing::debug;
use tungstenite::Message;

use super::{
    ConnectionInfo, FrameContext, Inspector, InspectorFactory, Verdict, opcode_name, preview,
};

/// Logs every frame.
pub struct FrameLog {
    preview_bytes: usize,
}

impl FrameLog {
    fn log(&self, context: &FrameContext<'_>, message: &Message) {
        debug!(
            conn = context.connection.conn_id,
            dir = context.direction.as_str(),
            opcode = opcode_name(message),
            len = message.len(),
            backend = context.backend,
            first = %preview(message, self.preview_bytes),
            "frame"
        );
    }
}

impl Inspector for FrameLog {
    fn on_message(&mut self, context: &FrameContext<'_>, message: &mut Message) -> Verdict {
        self.log(context, message);
        Verdict::Forward
    }

    fn on_control(&mut self, context: &FrameContext<'_>, message: &Message) {
        self.log(context, message);
    }
}

pub(super) struct FrameLogFactory;

fn parse(argument: Option<&str>) -> Result<usize, String> {
    match argument {
        None => Ok(32),
        Some("redact") => Ok(0),
        Some(number) => number.parse().map_err(|_| {
            format!("expected log, log:N (bytes to show) or log:redact, got {number:?}")
        }),
    }
}

impl InspectorFactory for FrameLogFactory {
    fn create(&self, _: &ConnectionInfo, argument: Option<&str>) -> Box<dyn Inspector> {
        Box::new(FrameLog {
            preview_bytes: parse(argument).unwrap_or(32),
        })
    }

    fn check_argument(&self, argument: Option<&str>) -> Result<(), String> {
        parse(argument).map(|_| ())
    }
}
