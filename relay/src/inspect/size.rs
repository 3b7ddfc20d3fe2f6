//! `max_size:SIZE`: a route-specific message size limit below `[limits] max_message_size`
//! (e.g. `max_size:4KiB`); a larger message closes its sender with 1009.

use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

use super::{ConnectionInfo, FrameContext, Inspector, InspectorFactory, Verdict};
use crate::config::ByteSize;

/// Refuses messages over a size.
pub struct MaxSize {
    limit: usize,
}

impl Inspector for MaxSize {
    fn on_message(&mut self, _: &FrameContext<'_>, message: &mut Message) -> Verdict {
        if message.len() > self.limit {
            Verdict::Close(
                CloseCode::Size,
                format!(
                    "message of {} bytes over this route's {} byte limit",
                    message.len(),
                    self.limit
                ),
            )
        } else {
            Verdict::Forward
        }
    }
}

pub(super) struct MaxSizeFactory;

impl InspectorFactory for MaxSizeFactory {
    fn create(&self, _: &ConnectionInfo, argument: Option<&str>) -> Box<dyn Inspector> {
        let limit = argument
            .and_then(|a| ByteSize::parse(a).ok())
            .map_or(usize::MAX, ByteSize::as_usize);
        Box::new(MaxSize { limit })
    }

    fn check_argument(&self, argument: Option<&str>) -> Result<(), String> {
        match argument {
            Some(size) => ByteSize::parse(size).map(|_| ()),
            None => Err("expected max_size:SIZE, e.g. max_size:4KiB".into()),
        }
    }
}
