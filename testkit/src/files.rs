//! Files a test writes: a temporary directory, a self-signed certificate in one, and a test CA
//! with the certificates it issues.

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

/// A certificate authority for tests: its certificate (`NAME-ca.pem`) and the certificates it
/// issues, each with its key, as PEM files in a [`TempDir`].
pub struct TestCa {
    dir: TempDir,
    name: String,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A certificate a [`TestCa`] issued, with its key.
pub struct IssuedCertificate {
    /// The certificate's PEM file.
    pub cert_path: PathBuf,
    /// The private key's PEM file.
    pub key_path: PathBuf,
    /// The certificate itself, e.g. to compare with what a peer presented.
    pub der: CertificateDer<'static>,
}

impl TestCa {
    /// A new CA whose files are named after `name`.
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key).unwrap();
        let dir = TempDir::new();
        dir.write(&format!("{name}-ca.pem"), &issuer.pem());
        TestCa {
            dir,
            name: name.to_owned(),
            issuer,
        }
    }

    /// The CA certificate's PEM file (what `tls.ca_file` names).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join(format!("{}-ca.pem", self.name))
    }

    /// The CA certificate, e.g. to trust it as a root.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// Issues a certificate for `names` (DNS names or IP addresses), usable by servers and
    /// clients alike, written as `STEM.pem` and `STEM-key.pem` (overwriting earlier ones).
    pub fn issue(&self, stem: &str, names: &[&str]) -> IssuedCertificate {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, stem.to_owned());
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        IssuedCertificate {
            cert_path: self.dir.write(&format!("{stem}.pem"), &cert.pem()),
            key_path: self
                .dir
                .write(&format!("{stem}-key.pem"), &key.serialize_pem()),
            der: cert.der().clone(),
        }
    }
}
