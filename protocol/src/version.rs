//! Version negotiation: turning the two sides' [`Hello`] frames into link parameters.
//!
//! Each side sends a `Hello` as the first frame on a link, without waiting for the peer's, and
//! reads the peer's `Hello` as the first frame it receives. Both then call [`negotiate`] with
//! their own and the peer's `Hello`; on an error the side closes the link with
//! [`PROTOCOL_ERROR`](crate::PROTOCOL_ERROR) (1002) and the error's text as the reason.

use crate::frame::{Hello, Limits, max_message_len};

/// The highest protocol version this implementation speaks; what it sends in `Hello.version`.
pub const PROTOCOL_VERSION: u16 = 1;

/// The lowest protocol version this implementation speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// Which side of a link a [`Hello`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// This end's own `Hello`.
    Local,
    /// The peer's `Hello`.
    Remote,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Local => "local",
            Side::Remote => "remote",
        })
    }
}

/// The parameters both ends of a link agreed on, seen from one end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinkParams {
    /// The protocol version the link runs: the lower of the two `Hello.version`s.
    pub version: u16,
    /// The largest `Data` payload this end may send: the peer's `max_frame`.
    pub send_max_frame: u32,
    /// The largest `Data` payload this end accepts: its own `max_frame`.
    pub recv_max_frame: u32,
    /// The credit this end starts with on every new stream: the peer's `initial_window`.
    pub send_initial_window: u32,
    /// The credit this end grants the peer on every new stream: its own `initial_window`.
    pub recv_initial_window: u32,
}

impl LinkParams {
    /// The decoder limits for frames received on this link: `base` with `max_frame` set to
    /// this end's own advertised `max_frame`.
    pub fn recv_limits(&self, base: Limits) -> Limits {
        Limits {
            max_frame: usize::try_from(self.recv_max_frame).unwrap_or(usize::MAX),
            ..base
        }
    }

    /// The largest binary WebSocket message this end may send on the link.
    pub fn max_send_message(&self) -> usize {
        max_message_len(self.send_max_frame)
    }

    /// The largest binary WebSocket message this end must accept on the link (configure the
    /// WebSocket layer's message size limit with this).
    pub fn max_recv_message(&self) -> usize {
        max_message_len(self.recv_max_frame)
    }
}

/// Why two `Hello`s could not be agreed on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NegotiateError {
    /// The link would run a version this end does not speak.
    #[error(
        "unsupported protocol version {version} (local speaks up to {local}, remote up to {remote}; \
         this implementation supports {min}..={max})",
        min = MIN_PROTOCOL_VERSION,
        max = PROTOCOL_VERSION
    )]
    UnsupportedVersion {
        /// The version the link would run: the lower of the two.
        version: u16,
        /// The local `Hello.version`.
        local: u16,
        /// The remote `Hello.version`.
        remote: u16,
    },
    /// A `Hello` advertises `max_frame` 0, so no message could ever be sent to that side.
    #[error("{side} Hello advertises max_frame 0")]
    ZeroMaxFrame {
        /// Whose `Hello`.
        side: Side,
    },
    /// A `Hello` advertises an `initial_window` smaller than its `max_frame`, so a message of
    /// the largest accepted size could never be sent on a fresh stream.
    #[error(
        "{side} Hello advertises initial_window {initial_window}, below its max_frame {max_frame}"
    )]
    WindowBelowMaxFrame {
        /// Whose `Hello`.
        side: Side,
        /// Its `initial_window`.
        initial_window: u32,
        /// Its `max_frame`.
        max_frame: u32,
    },
}

fn check(hello: &Hello, side: Side) -> Result<(), NegotiateError> {
    if hello.max_frame == 0 {
        return Err(NegotiateError::ZeroMaxFrame { side });
    }
    if hello.initial_window < hello.max_frame {
        return Err(NegotiateError::WindowBelowMaxFrame {
            side,
            initial_window: hello.initial_window,
            max_frame: hello.max_frame,
        });
    }
    Ok(())
}

/// Agrees on link parameters from this end's `local` Hello and the peer's `remote` Hello.
///
/// The link runs the lower of the two versions, which must lie in
/// [`MIN_PROTOCOL_VERSION`]`..=`[`PROTOCOL_VERSION`]. Each `Hello` must have a nonzero
/// `max_frame` and an `initial_window` at least as large as its `max_frame`. The result is the
/// same on both ends, with send and receive swapped.
pub fn negotiate(local: &Hello, remote: &Hello) -> Result<LinkParams, NegotiateError> {
    let version = local.version.min(remote.version);
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
        return Err(NegotiateError::UnsupportedVersion {
            version,
            local: local.version,
            remote: remote.version,
        });
    }
    check(local, Side::Local)?;
    check(remote, Side::Remote)?;
    Ok(LinkParams {
        version,
        send_max_frame: remote.max_frame,
        recv_max_frame: local.max_frame,
        send_initial_window: remote.initial_window,
        recv_initial_window: local.initial_window,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_and_mirrors() {
        let relay = Hello::new(1 << 20, 4 << 20);
        let backend = Hello::new(64 << 10, 256 << 10);
        let a = negotiate(&relay, &backend).unwrap();
        let b = negotiate(&backend, &relay).unwrap();
        assert_eq!(a.version, PROTOCOL_VERSION);
        assert_eq!(a.send_max_frame, 64 << 10);
        assert_eq!(a.recv_max_frame, 1 << 20);
        assert_eq!(a.send_initial_window, 256 << 10);
        assert_eq!(a.recv_initial_window, 4 << 20);
        assert_eq!(
            (
                b.send_max_frame,
                b.recv_max_frame,
                b.send_initial_window,
                b.recv_initial_window
            ),
            (
                a.recv_max_frame,
                a.send_max_frame,
                a.recv_initial_window,
                a.send_initial_window
            )
        );
        assert_eq!(a.recv_limits(Limits::DEFAULT).max_frame, 1 << 20);
        assert_eq!(a.max_recv_message(), (1 << 20) + crate::MESSAGE_SLACK);
        assert_eq!(a.max_send_message(), b.max_recv_message());
        assert_eq!(
            a.recv_limits(Limits::DEFAULT).max_string,
            Limits::DEFAULT.max_string
        );
    }

    #[test]
    fn newer_peer_falls_back_to_our_version() {
        let ours = Hello::new(1024, 1024);
        let newer = Hello {
            version: PROTOCOL_VERSION + 5,
            ..ours
        };
        assert_eq!(negotiate(&ours, &newer).unwrap().version, PROTOCOL_VERSION);
    }

    #[test]
    fn unsupported_versions_are_refused() {
        let ours = Hello::new(1024, 1024);
        let zero = Hello { version: 0, ..ours };
        let err = negotiate(&ours, &zero).unwrap_err();
        assert_eq!(
            err,
            NegotiateError::UnsupportedVersion {
                version: 0,
                local: PROTOCOL_VERSION,
                remote: 0
            }
        );
        assert!(
            err.to_string()
                .starts_with("unsupported protocol version 0")
        );
        // Both claiming a version above ours (a misconfigured local Hello) is refused too.
        let future = Hello {
            version: PROTOCOL_VERSION + 1,
            ..ours
        };
        assert!(matches!(
            negotiate(&future, &future),
            Err(NegotiateError::UnsupportedVersion { .. })
        ));
    }

    #[test]
    fn unusable_windows_are_refused() {
        let ok = Hello::new(1024, 1024);
        assert_eq!(
            negotiate(&ok, &Hello::new(0, 10)),
            Err(NegotiateError::ZeroMaxFrame { side: Side::Remote })
        );
        assert_eq!(
            negotiate(&Hello::new(2048, 1024), &ok),
            Err(NegotiateError::WindowBelowMaxFrame {
                side: Side::Local,
                initial_window: 1024,
                max_frame: 2048
            })
        );
    }
}
