//! `json`: text messages must be JSON. `json` closes the sender with 1007 on invalid JSON;
//! `json:drop` drops the message instead. Binary messages are refused the same way.

use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

use super::{ConnectionInfo, FrameContext, Inspector, InspectorFactory, Verdict};

/// Checks that every data message is a JSON text.
pub struct JsonOnly {
    drop_invalid: bool,
}

impl Inspector for JsonOnly {
    fn on_message(&mut self, _: &FrameContext<'_>, message: &mut Message) -> Verdict {
        let valid = match message {
            Message::Text(text) => {
                serde_json::from_str::<serde::de::IgnoredAny>(text.as_str()).is_ok()
            }
            _ => false,
        };
        match (valid, self.drop_invalid) {
            (true, _) => Verdict::Forward,
            (false, true) => Verdict::Drop,
            (false, false) => Verdict::Close(
                CloseCode::Invalid,
                "this route carries JSON text messages only".into(),
            ),
        }
    }
}

pub(super) struct JsonOnlyFactory;

impl InspectorFactory for JsonOnlyFactory {
    fn create(&self, _: &ConnectionInfo, argument: Option<&str>) -> Box<dyn Inspector> {
        Box::new(JsonOnly {
            drop_invalid: argument == Some("drop"),
        })
    }

    fn check_argument(&self, argument: Option<&str>) -> Result<(), String> {
        match argument {
            None | Some("close") | Some("drop") => Ok(()),
            Some(other) => Err(format!(
                "expected \"json\", \"json:close\" or \"json:drop\", got {other:?}"
            )),
        }
    }
}
