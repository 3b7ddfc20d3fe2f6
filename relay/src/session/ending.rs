//! How a session ends, as a pure decision: given why the pump stopped and the upstream's
//! `on_backend_loss` policy, what each leg is told, who is said to have closed, and whether the
//! client moves to another backend instead. The session only carries the decision out.

use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::config::OnBackendLoss;
use crate::pump::{Direction, PumpEnd, Side};

/// What the session does next.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Next {
    /// The relay started draining: keep pumping until this session's turn to close.
    Drain,
    /// Move the client to the next backend in its rank, keeping its socket; the lost leg, if
    /// still alive, is told `farewell` first.
    Reoriginate {
        /// The Close for the old backend leg, when it is still open.
        farewell: Option<CloseFrame>,
    },
    /// End the session.
    Close(Closing),
}

/// What one leg is told at the end.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Farewell {
    /// Send this Close (with `None`: complete the close handshake the peer began), then wait
    /// for the peer to end the connection.
    Close(Option<CloseFrame>),
    /// The leg is gone already.
    Nothing,
}

/// Who ended a session, as metrics and logs say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClosedBy {
    /// The client closed or went away.
    Client,
    /// The backend closed or went away.
    Backend,
    /// The relay decided (a violation, a limit, an inspector, idle, drain, no backend left).
    Relay,
}

impl ClosedBy {
    /// `client`, `backend` or `relay`.
    pub fn as_str(self) -> &'static str {
        match self {
            ClosedBy::Client => "client",
            ClosedBy::Backend => "backend",
            ClosedBy::Relay => "relay",
        }
    }
}

/// How a session ends.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Closing {
    /// What the client is told.
    pub client: Farewell,
    /// What the backend is told.
    pub backend: Farewell,
    /// The leg told first, when the other still has something coming: the messages it sends
    /// until its close reach the other leg, which is told after. A leg that broke the protocol
    /// is told last, so that the answers to its earlier, valid messages still reach it.
    pub first: Option<Side>,
    /// Who ended it.
    pub by: ClosedBy,
    /// The close code the client got, if any.
    pub client_code: Option<u16>,
    /// How it ended, in words, for the log.
    pub how: String,
}

/// Decides what follows `end`. `draining` says whether the relay's drain had already begun
/// (the second `Drain` is this session's turn to close).
pub(crate) fn decide(end: &PumpEnd, on_backend_loss: OnBackendLoss, draining: bool) -> Next {
    let moves = on_backend_loss == OnBackendLoss::Reconnect;
    match end {
        PumpEnd::Drain if !draining => Next::Drain,
        PumpEnd::Drain => both(
            close(CloseCode::Away, "going away: relay shutting down"),
            ClosedBy::Relay,
            "drained".into(),
        ),
        PumpEnd::Idle => both(
            close(CloseCode::Normal, "idle timeout"),
            ClosedBy::Relay,
            "idle timeout".into(),
        ),
        PumpEnd::ClientClosed(frame) => Next::Close(Closing {
            client: Farewell::Close(None),
            backend: Farewell::Close(frame.clone()),
            first: None,
            by: ClosedBy::Client,
            client_code: frame.as_ref().map(|f| u16::from(f.code)),
            how: format!("client closed ({})", describe(frame)),
        }),
        PumpEnd::ClientGone(reason) => Next::Close(Closing {
            client: Farewell::Nothing,
            backend: Farewell::Close(Some(close(CloseCode::Away, "client went away"))),
            first: None,
            by: ClosedBy::Client,
            client_code: None,
            how: format!("client gone: {reason}"),
        }),
        PumpEnd::ClientViolation(code, reason) => Next::Close(Closing {
            client: Farewell::Close(Some(close(*code, reason))),
            backend: Farewell::Close(Some(close(CloseCode::Away, "client went away"))),
            first: Some(Side::Backend),
            by: ClosedBy::Relay,
            client_code: Some(u16::from(*code)),
            how: format!("client violation ({code}: {reason})"),
        }),
        PumpEnd::BackendViolation(code, reason) => Next::Close(Closing {
            client: Farewell::Close(Some(close(
                CloseCode::Bad(1014),
                "bad gateway: the backend misbehaved",
            ))),
            backend: Farewell::Close(Some(close(*code, reason))),
            first: Some(Side::Client),
            by: ClosedBy::Relay,
            client_code: Some(1014),
            how: format!("backend violation ({code}: {reason})"),
        }),
        PumpEnd::Inspector(direction, code, reason) => {
            Next::Close(inspector_closing(*direction, *code, reason))
        }
        PumpEnd::BackendClosed(frame) if is_backend_loss(frame) && moves => {
            Next::Reoriginate { farewell: None }
        }
        PumpEnd::BackendClosed(frame) if is_backend_loss(frame) => Next::Close(Closing {
            backend: Farewell::Close(None),
            ..backend_unavailable(
                ClosedBy::Backend,
                format!("backend closed ({})", describe(frame)),
            )
        }),
        PumpEnd::BackendClosed(frame) => Next::Close(Closing {
            client: Farewell::Close(frame.clone()),
            backend: Farewell::Close(None),
            first: None,
            by: ClosedBy::Backend,
            client_code: frame.as_ref().map(|f| u16::from(f.code)),
            how: format!("backend closed ({})", describe(frame)),
        }),
        PumpEnd::BackendGone(_) if moves => Next::Reoriginate { farewell: None },
        PumpEnd::BackendGone(reason) => Next::Close(backend_unavailable(
            ClosedBy::Backend,
            format!("backend gone: {reason}"),
        )),
        PumpEnd::ClosedByAdmin(code, reason) => Next::Close(Closing {
            client: Farewell::Close(Some(close(CloseCode::from(*code), reason))),
            backend: Farewell::Close(Some(close(CloseCode::Away, "client went away"))),
            first: None,
            by: ClosedBy::Relay,
            client_code: Some(*code),
            how: format!("closed by the admin ({code}: {reason})"),
        }),
        PumpEnd::BackendDrained if moves => Next::Reoriginate {
            farewell: Some(close(CloseCode::Away, "going away: backend drained")),
        },
        PumpEnd::BackendDrained => Next::Close(Closing {
            backend: Farewell::Close(Some(close(CloseCode::Away, "going away: backend drained"))),
            ..backend_unavailable(ClosedBy::Relay, "backend drained".into())
        }),
    }
}

/// An inspector's verdict on a message going `direction`: its sender gets the code, the other
/// leg 1001.
fn inspector_closing(direction: Direction, code: CloseCode, reason: &str) -> Closing {
    let verdict = Farewell::Close(Some(close(code, reason)));
    let going_away = Farewell::Close(Some(close(CloseCode::Away, "going away")));
    let (client, backend, client_code) = match direction {
        Direction::ClientToBackend => (verdict, going_away, u16::from(code)),
        Direction::BackendToClient => (going_away, verdict, 1001),
    };
    Closing {
        client,
        backend,
        first: None,
        by: ClosedBy::Relay,
        client_code: Some(client_code),
        how: format!("inspector ({code}: {reason})"),
    }
}

/// The client is told 1012 (its backend is unavailable and it was not moved); the backend
/// leg is gone.
pub(crate) fn backend_unavailable(by: ClosedBy, how: String) -> Closing {
    Closing {
        client: Farewell::Close(Some(close(CloseCode::Restart, "backend unavailable"))),
        backend: Farewell::Nothing,
        first: None,
        by,
        client_code: Some(1012),
        how,
    }
}

/// Both legs are told the same.
fn both(frame: CloseFrame, by: ClosedBy, how: String) -> Next {
    Next::Close(Closing {
        client: Farewell::Close(Some(frame.clone())),
        backend: Farewell::Close(Some(frame.clone())),
        first: None,
        by,
        client_code: Some(u16::from(frame.code)),
        how,
    })
}

/// Backend closes that mean "this backend is going away", not "this conversation is over".
fn is_backend_loss(frame: &Option<CloseFrame>) -> bool {
    matches!(
        frame.as_ref().map(|f| f.code),
        Some(CloseCode::Away | CloseCode::Restart | CloseCode::Again)
    )
}

/// A Close frame whose reason fits the 123 bytes a close frame allows, cut at a character
/// boundary.
pub(crate) fn close(code: CloseCode, reason: &str) -> CloseFrame {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseFrame {
        code,
        reason: reason[..end].to_owned().into(),
    }
}

fn describe(frame: &Option<CloseFrame>) -> String {
    match frame {
        Some(frame) => format!("{} {:?}", u16::from(frame.code), frame.reason.as_str()),
        None => "no status".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECONNECT: OnBackendLoss = OnBackendLoss::Reconnect;
    const CLOSE: OnBackendLoss = OnBackendLoss::Close;

    fn closing(end: PumpEnd, policy: OnBackendLoss) -> Closing {
        match decide(&end, policy, false) {
            Next::Close(closing) => closing,
            other => panic!("{end:?} under {policy:?} gave {other:?}"),
        }
    }

    fn code_of(farewell: &Farewell) -> Option<u16> {
        match farewell {
            Farewell::Close(Some(frame)) => Some(u16::from(frame.code)),
            _ => None,
        }
    }

    #[test]
    fn a_backend_going_away_moves_the_client_or_closes_it_1012() {
        for code in [CloseCode::Away, CloseCode::Restart, CloseCode::Again] {
            let end = PumpEnd::BackendClosed(Some(close(code, "bye")));
            assert_eq!(
                decide(&end, RECONNECT, false),
                Next::Reoriginate { farewell: None }
            );
            let closed = closing(end, CLOSE);
            assert_eq!(closed.client_code, Some(1012));
            assert_eq!(closed.by, ClosedBy::Backend);
        }
        let gone = PumpEnd::BackendGone("reset".into());
        assert_eq!(
            decide(&gone, RECONNECT, false),
            Next::Reoriginate { farewell: None }
        );
        assert_eq!(code_of(&closing(gone, CLOSE).client), Some(1012));
    }

    #[test]
    fn a_backend_ending_the_conversation_passes_its_close_on() {
        let end = PumpEnd::BackendClosed(Some(close(CloseCode::Library(4000), "done")));
        for policy in [RECONNECT, CLOSE] {
            let closed = closing(end.clone(), policy);
            assert_eq!(closed.client_code, Some(4000));
            assert_eq!(
                closed.backend,
                Farewell::Close(None),
                "completes the handshake"
            );
        }
    }

    #[test]
    fn a_drained_backend_gets_a_farewell_either_way() {
        let moved = decide(&PumpEnd::BackendDrained, RECONNECT, false);
        assert!(
            matches!(moved, Next::Reoriginate { farewell: Some(ref f) } if f.code == CloseCode::Away)
        );
        let closed = closing(PumpEnd::BackendDrained, CLOSE);
        assert_eq!(closed.client_code, Some(1012));
        assert_eq!(code_of(&closed.backend), Some(1001));
    }

    #[test]
    fn client_side_ends() {
        let closed = closing(
            PumpEnd::ClientClosed(Some(close(CloseCode::Normal, ""))),
            RECONNECT,
        );
        assert_eq!(
            (closed.by, closed.client_code),
            (ClosedBy::Client, Some(1000))
        );
        assert_eq!(
            code_of(&closed.backend),
            Some(1000),
            "the client's close goes on"
        );
        let gone = closing(PumpEnd::ClientGone("reset".into()), RECONNECT);
        assert_eq!(gone.client, Farewell::Nothing);
        assert_eq!(code_of(&gone.backend), Some(1001));
        let bad = closing(
            PumpEnd::ClientViolation(CloseCode::Size, "big".into()),
            RECONNECT,
        );
        assert_eq!(
            bad.first,
            Some(Side::Backend),
            "earlier replies still reach the client"
        );
        assert_eq!(code_of(&bad.backend), Some(1001));
        assert_eq!((bad.by, bad.client_code), (ClosedBy::Relay, Some(1009)));
    }

    #[test]
    fn the_relay_decides_the_rest() {
        let bad = closing(
            PumpEnd::BackendViolation(CloseCode::Protocol, "x".into()),
            CLOSE,
        );
        assert_eq!(bad.client_code, Some(1014));
        assert_eq!(code_of(&bad.backend), Some(1002));
        let from_client =
            PumpEnd::Inspector(Direction::ClientToBackend, CloseCode::Policy, "no".into());
        let closed = closing(from_client, RECONNECT);
        assert_eq!(
            (code_of(&closed.client), code_of(&closed.backend)),
            (Some(1008), Some(1001))
        );
        let from_backend =
            PumpEnd::Inspector(Direction::BackendToClient, CloseCode::Policy, "no".into());
        let closed = closing(from_backend, RECONNECT);
        assert_eq!(
            (code_of(&closed.client), code_of(&closed.backend)),
            (Some(1001), Some(1008))
        );
        assert_eq!(closing(PumpEnd::Idle, RECONNECT).client_code, Some(1000));
    }

    #[test]
    fn an_admins_close_reaches_the_client_with_its_code() {
        let closed = closing(PumpEnd::ClosedByAdmin(4000, "bye".into()), RECONNECT);
        assert_eq!(
            (closed.by, closed.client_code),
            (ClosedBy::Relay, Some(4000))
        );
        assert_eq!(code_of(&closed.client), Some(4000));
        assert_eq!(code_of(&closed.backend), Some(1001));
    }

    #[test]
    fn a_drain_first_waits_then_closes_1001() {
        assert_eq!(decide(&PumpEnd::Drain, RECONNECT, false), Next::Drain);
        let Next::Close(closed) = decide(&PumpEnd::Drain, RECONNECT, true) else {
            panic!("the second drain closes");
        };
        assert_eq!(
            (closed.by, closed.client_code),
            (ClosedBy::Relay, Some(1001))
        );
    }

    #[test]
    fn close_reasons_fit_a_frame() {
        let long = "é".repeat(100);
        let frame = close(CloseCode::Normal, &long);
        assert!(frame.reason.len() <= 123);
        assert!(long.starts_with(frame.reason.as_str()));
    }
}
