//! The TLS material a configuration names, read from its PEM files each time a configuration
//! is loaded (at start, at every reload, by `wsrelay check`) and never per connection: the
//! client listener's certificate (`[server] tls_cert`, `tls_key`) and the client settings of
//! each upstream with `wss://` backends (`[upstream.NAME] tls`: trusted roots, client
//! certificate, server name). Every problem names its key and, for a file, its line.
//!
//! Paths are relative to the config file's directory. Without `tls.ca_file` an upstream trusts
//! the operating system's roots (read with `rustls-native-certs`: the CA bundle the
//! distribution keeps up to date, plus whatever an operator added to it, which a compiled-in
//! list such as `webpki-roots` would ignore), read once per load for all upstreams.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};

use crate::config::{Config, ConfigError, UpstreamConfig, UpstreamTlsConfig};
use crate::upstream::BackendTls;

/// What one load of a configuration's TLS files gave.
pub(crate) struct Certificates {
    /// The listener's certificate, when `[server]` sets `tls_cert` and `tls_key`.
    pub listener: Option<ListenerChain>,
    /// The TLS settings of each upstream that has a `wss://` backend, by name.
    pub upstreams: BTreeMap<String, Arc<BackendTls>>,
}

/// The listener's rustls configuration and the chain it presents: a reload compares the chain
/// with the one in force to tell whether the certificate changed.
pub(crate) struct ListenerChain {
    pub config: Arc<ServerConfig>,
    pub chain: Vec<CertificateDer<'static>>,
}

/// A problem found: the span of the key in the file, the key, what is wrong.
type Problem = (Range<usize>, String, String);

/// Reads every TLS file `config` names; `dir` is the config file's directory (relative paths
/// are resolved against it), `origin` names the configuration in the error.
pub(crate) fn load(
    config: &Config,
    dir: Option<&Path>,
    origin: &str,
) -> Result<Certificates, ConfigError> {
    let mut problems = Vec::new();
    let listener = match (&config.server.tls_cert, &config.server.tls_key) {
        (Some(cert), Some(key)) => {
            let files = (
                near(dir, cert.get_ref()),
                near(dir, key.get_ref()),
                cert.span(),
                key.span(),
            );
            match listener(&files.0, &files.1) {
                Ok((config, chain)) => Some(ListenerChain {
                    config: Arc::new(config),
                    chain,
                }),
                Err((Which::Cert, message)) => {
                    problems.push((files.2, "server.tls_cert".to_owned(), message));
                    None
                }
                Err((Which::Key, message)) => {
                    problems.push((files.3, "server.tls_key".to_owned(), message));
                    None
                }
            }
        }
        _ => None,
    };
    let mut system_roots = None;
    let mut upstreams = BTreeMap::new();
    for (name, upstream) in &config.upstreams {
        if !upstream.has_wss_backends() {
            continue;
        }
        match backend_tls(name, upstream, dir, &mut system_roots) {
            Ok(tls) => {
                upstreams.insert(name.clone(), Arc::new(tls));
            }
            Err(problem) => problems.push(problem),
        }
    }
    config.error_at(origin, problems)?;
    Ok(Certificates {
        listener,
        upstreams,
    })
}

/// `path`, relative to `dir` when it is relative and there is a `dir`.
fn near(dir: Option<&Path>, path: &Path) -> PathBuf {
    match dir {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path.to_owned(),
    }
}

/// Which file of a certificate and key pair a problem is about.
enum Which {
    Cert,
    Key,
}

/// The listener's configuration: TLS 1.2 and 1.3, ALPN `http/1.1`, no client certificates.
/// Also returns the chain it presents.
fn listener(
    cert: &Path,
    key: &Path,
) -> Result<(ServerConfig, Vec<CertificateDer<'static>>), (Which, String)> {
    let chain = read_certificates(cert).map_err(|e| (Which::Cert, e))?;
    let presented = chain.clone();
    let key = read_key(key).map_err(|e| (Which::Key, e))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| (Which::Cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| (Which::Key, format!("TLS certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((config, presented))
}

/// The client settings of upstream `name`'s `wss://` backends.
fn backend_tls(
    name: &str,
    upstream: &UpstreamConfig,
    dir: Option<&Path>,
    system_roots: &mut Option<Result<Arc<RootCertStore>, String>>,
) -> Result<BackendTls, Problem> {
    let none = UpstreamTlsConfig::default();
    let (tls, span) = match &upstream.tls {
        Some(tls) => (tls.get_ref(), tls.span()),
        None => (&none, upstream.backends_span()),
    };
    let problem = |field: &str, message: String| {
        (span.clone(), format!("upstream.{name}.tls{field}"), message)
    };
    let roots = match &tls.ca_file {
        Some(path) => {
            let path = near(dir, path);
            let mut roots = RootCertStore::empty();
            for certificate in read_certificates(&path).map_err(|e| problem(".ca_file", e))? {
                roots.add(certificate).map_err(|e| {
                    problem(
                        ".ca_file",
                        format!("{}: not a CA certificate: {e}", path.display()),
                    )
                })?;
            }
            Arc::new(roots)
        }
        None => system_roots
            .get_or_insert_with(read_system_roots)
            .clone()
            .map_err(|e| problem("", e))?,
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| problem("", e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let chain =
                read_certificates(&near(dir, cert)).map_err(|e| problem(".client_cert", e))?;
            let key = read_key(&near(dir, key)).map_err(|e| problem(".client_key", e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| problem(".client_key", format!("client certificate and key: {e}")))?
        }
        // One without the other is a problem the checker reports.
        _ => builder.with_no_client_auth(),
    };
    // A WebSocket upgrade is HTTP/1.1: a backend that also speaks h2 must not pick it.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let server_name = match &tls.server_name {
        Some(text) => Some(
            ServerName::try_from(text.clone())
                .map_err(|e| problem(".server_name", format!("{text:?}: {e}")))?,
        ),
        None => None,
    };
    Ok(BackendTls::new(Arc::new(config), server_name))
}

/// The operating system's trusted roots, or why there are none.
fn read_system_roots() -> Result<Arc<RootCertStore>, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (_, unusable) = roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        return Err(format!(
            "the system's trust store has no usable CA certificate ({} unusable{}{}); set tls.ca_file",
            unusable,
            if errors.is_empty() { "" } else { "; " },
            errors.join("; ")
        ));
    }
    Ok(Arc::new(roots))
}

/// Every certificate of a PEM file; at least one.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let error = |reason: String| format!("{}: {reason}", path.display());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| error(e.to_string()))?;
    if chain.is_empty() {
        return Err(error("no CERTIFICATE in the file".into()));
    }
    Ok(chain)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(upstream_extra: &str, backends: &str) -> Config {
        let source = format!(
            "[[route]]\npath = \"/\"\nupstream = \"u\"\n[upstream.u]\nbackends = [{backends}]\n{upstream_extra}\n"
        );
        Config::from_toml(&source, "t.toml").unwrap()
    }

    fn problems(config: &Config, dir: &Path) -> Vec<String> {
        match load(config, Some(dir), "t.toml") {
            Ok(_) => Vec::new(),
            Err(error) => error.problems.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn plain_backends_need_no_tls_settings() {
        let loaded = load(&config("", "\"ws://127.0.0.1:1\""), None, "t").unwrap();
        assert!(loaded.upstreams.is_empty());
        assert!(loaded.listener.is_none());
    }

    #[test]
    fn unreadable_and_unparsable_files_name_their_key_line_and_path() {
        let dir = std::env::temp_dir().join(format!("wsrelay-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("junk.pem"), "not a certificate\n").unwrap();
        let missing = config(
            "tls = { ca_file = \"missing.pem\" }",
            "\"wss://127.0.0.1:1\"",
        );
        let found = problems(&missing, &dir);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("line 6: upstream.u.tls.ca_file: "),
            "{found:?}"
        );
        assert!(found[0].contains("missing.pem"), "{found:?}");
        let junk = config("tls = { ca_file = \"junk.pem\" }", "\"wss://127.0.0.1:1\"");
        let found = problems(&junk, &dir);
        assert!(found[0].contains("no CERTIFICATE in the file"), "{found:?}");
        let key = config(
            "tls = { ca_file = \"junk.pem\", client_cert = \"junk.pem\", client_key = \"junk.pem\" }",
            "\"wss://127.0.0.1:1\"",
        );
        assert_eq!(
            problems(&key, &dir).len(),
            1,
            "the first bad file stops the upstream"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
