//! Files a test writes: a temporary directory, and a self-signed certificate in one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rustls_pki_types::CertificateDer;

/// A fresh directory under the system temp dir, removed (with its files) when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a directory no other test of any process uses.
    pub fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "wsrelay-test-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes (or overwrites) the file `name` in the directory; returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A self-signed certificate for `localhost`, with its key, as PEM files in a [`TempDir`].
pub struct TestCertificate {
    dir: TempDir,
    der: CertificateDer<'static>,
}

impl TestCertificate {
    /// Generates a certificate and writes `cert.pem` and `key.pem`.
    pub fn new() -> TestCertificate {
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let dir = TempDir::new();
        dir.write("cert.pem", &generated.cert.pem());
        dir.write("key.pem", &generated.signing_key.serialize_pem());
        TestCertificate {
            dir,
            der: generated.cert.der().clone(),
        }
    }

    /// The certificate's PEM file.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// The private key's PEM file.
    pub fn key_path(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }

    /// The certificate itself, e.g. to trust it as a root.
    pub fn der(&self) -> CertificateDer<'static> {
        self.der.clone()
    }

    /// The `[server]` lines that serve `wss://` with this certificate:
    /// `tls_cert = "..."` and `tls_key = "..."`, each ending in a newline.
    pub fn server_lines(&self) -> String {
        format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            self.cert_path().display(),
            self.key_path().display()
        )
    }
}

impl Default for TestCertificate {
    fn default() -> Self {
        TestCertificate::new()
    }
}
