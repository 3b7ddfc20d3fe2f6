//! DNS discovery of backends (`discover = { dns, refresh, scheme, path }` on an upstream): the
//! backends are `scheme://ADDRESS:port/path` for every A and AAAA record of the name, looked up
//! every `refresh` through one resolver (`[server] resolver`, else the system's).
//!
//! This module only finds sets: [`lookup`] turns a name into a backend set, [`Streak`] decides
//! what a run of failures logs, and a [`Watch`] loop looks up on its schedule and hands every
//! answer to the control plane, which applies a changed set as a reload would (added backends
//! join the ranking; removed ones drain, and their clients move or close 1012 after
//! `shutdown_grace`). A failed lookup keeps the last set.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{BackendConfig, BackendUrl, DiscoverConfig};

/// Time one DNS query waits for its answer before the resolver tries again.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest a whole lookup (retries, A and AAAA) may take, whatever the refresh.
const MAX_LOOKUP: Duration = Duration::from_secs(10);
/// The shortest a whole lookup is allowed, however short the refresh.
const MIN_LOOKUP: Duration = Duration::from_secs(1);

/// Builds the resolver of every `discover` upstream: `server` alone (UDP, then TCP for
/// truncated answers) when `[server] resolver` is set, else the system's configuration. Answers
/// are never cached: each refresh asks again, so a change is seen at the next refresh whatever
/// the records' TTL.
pub(crate) fn resolver(server: Option<SocketAddr>) -> Result<TokioResolver, String> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = match server {
        Some(addr) => {
            let mut name_server = NameServerConfig::udp_and_tcp(addr.ip());
            for connection in &mut name_server.connections {
                connection.port = addr.port();
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![name_server]),
                provider,
            )
        }
        None => TokioResolver::builder(provider).map_err(|error| {
            format!(
                "read the system's DNS configuration (/etc/resolv.conf): {error}; set [server] resolver = \"IP:53\""
            )
        })?,
    };
    let options = builder.options_mut();
    options.timeout = QUERY_TIMEOUT;
    options.positive_max_ttl = Some(Duration::ZERO);
    options.negative_max_ttl = Some(Duration::ZERO);
    builder
        .build()
        .map_err(|error| format!("build the DNS resolver: {error}"))
}

/// Why a lookup gave no set; the last set stays in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LookupError {
    /// No answer in time.
    #[error("lookup of {name} timed out after {after:?}")]
    Timeout {
        /// The name looked up.
        name: String,
        /// How long the lookup waited.
        after: Duration,
    },
    /// The name exists nowhere (NXDOMAIN) or has no A or AAAA record.
    #[error("{name} has no A or AAAA record ({detail})")]
    NoAddresses {
        /// The name looked up.
        name: String,
        /// What the server said.
        detail: String,
    },
    /// The server failed (SERVFAIL, REFUSED), or could not be reached.
    #[error("lookup of {name} failed: {detail}")]
    Failed {
        /// The name looked up.
        name: String,
        /// What went wrong.
        detail: String,
    },
    /// An address made a URL the relay can't dial (the config check tries one; this is the
    /// rest).
    #[error("{0}")]
    BadUrl(String),
}

/// How long a lookup for an upstream refreshed every `refresh` may take: a lookup slower than
/// its refresh is of no use, but DNS over a lossy network needs a retry or two.
fn lookup_deadline(refresh: Duration) -> Duration {
    refresh.clamp(MIN_LOOKUP, MAX_LOOKUP)
}

/// Resolves `discover.dns` once: its backend set, or why there is none.
pub(crate) async fn lookup(
    resolver: &TokioResolver,
    discover: &DiscoverConfig,
) -> Result<Vec<BackendConfig>, LookupError> {
    let name = &discover.dns.name;
    let after = lookup_deadline(discover.refresh.0);
    let answer = tokio::time::timeout(after, resolver.lookup_ip(name.as_str()))
        .await
        .map_err(|_| LookupError::Timeout {
            name: name.clone(),
            after,
        })?;
    let addresses = answer.map_err(|error| {
        if error.is_no_records_found() {
            LookupError::NoAddresses {
                name: name.clone(),
                detail: error.to_string(),
            }
        } else {
            LookupError::Failed {
                name: name.clone(),
                detail: error.to_string(),
            }
        }
    })?;
    let set = backend_set(discover, addresses.iter())?;
    if set.is_empty() {
        return Err(LookupError::NoAddresses {
            name: name.clone(),
            detail: "empty answer".to_owned(),
        });
    }
    Ok(set)
}

/// The backends for `addresses`, once each, in address order (the order only makes logs and
/// `/api/backends` stable: rankings don't depend on it).
pub(crate) fn backend_set(
    discover: &DiscoverConfig,
    addresses: impl IntoIterator<Item = IpAddr>,
) -> Result<Vec<BackendConfig>, LookupError> {
    let unique: BTreeSet<IpAddr> = addresses.into_iter().collect();
    unique
        .into_iter()
        .map(|address| {
            let url = BackendUrl::parse(&discover.url_of(address)).map_err(LookupError::BadUrl)?;
            Ok(BackendConfig { url, weight: 1.0 })
        })
        .collect()
}

/// A run of failed lookups: the first failure of a run is logged, the rest only counted, and
/// the first success after it is logged as a recovery.
#[derive(Debug, Default)]
pub(crate) struct Streak {
    failures: u64,
}

impl Streak {
    /// Records a failure; true if it starts a run (so it is the one to log).
    pub fn failed(&mut self) -> bool {
        self.failures += 1;
        self.failures == 1
    }

    /// Records a success; the length of the run it ends, if it ends one.
    pub fn succeeded(&mut self) -> Option<u64> {
        let ended = std::mem::take(&mut self.failures);
        (ended > 0).then_some(ended)
    }
}

/// What a [`Watch`] tells its owner.
pub(crate) trait Discoveries: Send + Sync + 'static {
    /// `upstream`'s name resolved to `backends` (changed or not).
    fn found(&self, upstream: &str, backends: Vec<BackendConfig>);
    /// A lookup for `upstream` failed; its last set stays.
    fn failed(&self, upstream: &str);
}

/// The refresh loop of one `discover` upstream.
pub(crate) struct Watch {
    /// The upstream's name.
    pub upstream: String,
    /// Its `discover` settings.
    pub discover: DiscoverConfig,
    /// The relay's resolver.
    pub resolver: TokioResolver,
    /// The lookup made before the watch started failed (and was logged): the watch's first
    /// failures continue that streak.
    pub failing: bool,
}

impl Watch {
    /// Looks up every `refresh` (the first time one `refresh` from now: the caller resolved
    /// before starting it), reporting each answer to `owner`, until `stop`.
    pub async fn run(self, owner: impl Discoveries, stop: CancellationToken) {
        let upstream = self.upstream.as_str();
        let mut streak = Streak::default();
        if self.failing {
            streak.failed();
        }
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.discover.refresh.0) => {}
                () = stop.cancelled() => return,
            }
            let answer = tokio::select! {
                answer = lookup(&self.resolver, &self.discover) => answer,
                () = stop.cancelled() => return,
            };
            match answer {
                Ok(backends) => {
                    if let Some(failures) = streak.succeeded() {
                        info!(
                            upstream,
                            dns = %self.discover.dns,
                            failures,
                            backends = backends.len(),
                            "discovery recovered"
                        );
                    }
                    owner.found(upstream, backends);
                }
                Err(error) => {
                    owner.failed(upstream);
                    if streak.failed() {
                        warn!(
                            upstream,
                            %error,
                            "discovery failed; keeping the last backend set and retrying every refresh"
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DnsTarget, HumanDuration, Scheme};

    fn discover(path: &str) -> DiscoverConfig {
        DiscoverConfig {
            dns: DnsTarget::parse("chat.test:9000").unwrap(),
            refresh: HumanDuration(Duration::from_secs(5)),
            scheme: Scheme::Ws,
            path: path.to_owned(),
        }
    }

    #[test]
    fn addresses_become_backend_urls_once_each_in_order() {
        let addresses: Vec<IpAddr> = ["127.0.0.5", "::1", "127.0.0.2", "127.0.0.5"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let set = backend_set(&discover("/chat"), addresses).unwrap();
        let urls: Vec<&str> = set.iter().map(|b| b.url.original.as_ref()).collect();
        assert_eq!(
            urls,
            [
                "ws://127.0.0.2:9000/chat",
                "ws://127.0.0.5:9000/chat",
                "ws://[::1]:9000/chat"
            ]
        );
        assert_eq!(set[2].url.authority, "[::1]:9000");
        assert_eq!(set[0].url.base_path, "/chat");
        assert!(set.iter().all(|b| b.weight == 1.0));
        assert!(backend_set(&discover(""), []).unwrap().is_empty());
    }

    #[test]
    fn a_streak_logs_its_first_failure_and_its_end() {
        let mut streak = Streak::default();
        assert_eq!(streak.succeeded(), None, "no streak to end");
        assert!(streak.failed());
        assert!(!streak.failed());
        assert!(!streak.failed());
        assert_eq!(streak.succeeded(), Some(3));
        assert_eq!(streak.succeeded(), None);
        assert!(streak.failed(), "a new streak is logged again");
    }

    #[test]
    fn a_lookup_is_bounded_by_its_refresh_within_limits() {
        assert_eq!(lookup_deadline(Duration::from_millis(100)), MIN_LOOKUP);
        assert_eq!(
            lookup_deadline(Duration::from_secs(5)),
            Duration::from_secs(5)
        );
        assert_eq!(lookup_deadline(Duration::from_secs(600)), MAX_LOOKUP);
    }
}
