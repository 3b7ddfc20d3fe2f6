//! Static files for plain `GET`s (`[server] static_dir`, or files built into the program):
//! the pages of an application served beside its WebSockets on the same listener. `index.html` answers a folder, the content type
//! follows the extension, `ETag` and `Last-Modified` let browsers revalidate (`304`), `HEAD`
//! answers the headers only. A path that would leave the folder, hidden files and anything
//! that is not a readable regular file get `404`.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::Full;

/// Files larger than this are not served (the relay is not a file server).
const MAX_FILE: u64 = 32 << 20;

/// Where the files answering plain `GET`s come from: a folder (`[server] static_dir`) or a
/// set built into the program ([`EmbeddedFiles`], as `wsrelay demo` serves its page).
#[derive(Debug, Clone)]
pub(crate) enum StaticFiles {
    /// A folder, canonical, so that nothing outside it can be named.
    Folder(PathBuf),
    /// Files held in memory.
    Embedded(Arc<EmbeddedFiles>),
}

/// Files an application builds into itself and serves beside its WebSockets, with the same
/// answers as `[server] static_dir` gives (content types, `ETag` revalidation, `HEAD`, `404`).
///
/// ```
/// let files = wsrelay::EmbeddedFiles::new()
///     .file("/index.html", "<!doctype html><title>chat</title>")
///     .file("/app.js", "console.log('hi')");
/// assert_eq!(files.len(), 2);
/// ```
#[derive(Debug, Clone, Default)]
pub struct EmbeddedFiles {
    files: HashMap<String, EmbeddedFile>,
}

#[derive(Debug, Clone)]
struct EmbeddedFile {
    contents: Bytes,
    content_type: HeaderValue,
    tag: String,
}

impl EmbeddedFiles {
    /// No files yet.
    pub fn new() -> EmbeddedFiles {
        EmbeddedFiles::default()
    }

    /// Adds `contents` as the file at `path` (`/index.html` also answers `/`); the content
    /// type follows the extension.
    pub fn file(mut self, path: &str, contents: impl Into<Bytes>) -> EmbeddedFiles {
        let contents = contents.into();
        let mime = mime_guess::from_path(path).first_or_octet_stream();
        let content_type = HeaderValue::from_str(mime.essence_str())
            .unwrap_or(HeaderValue::from_static("application/octet-stream"));
        let tag = format!(
            "\"{:x}-{:x}\"",
            contents.len(),
            xxhash_rust::xxh3::xxh3_64(&contents)
        );
        let file = EmbeddedFile {
            contents,
            content_type,
            tag,
        };
        self.files
            .insert(format!("/{}", path.trim_start_matches('/')), file);
        self
    }

    /// How many files there are.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The file a request path names: `index.html` for a folder path.
    fn find(&self, path: &str) -> Option<&EmbeddedFile> {
        let relative = safe_relative_path(path)?;
        let mut name = String::new();
        for part in relative.iter() {
            name.push('/');
            name.push_str(part.to_str()?);
        }
        if let Some(file) = self.files.get(&name) {
            return Some(file);
        }
        self.files.get(&format!("{name}/index.html"))
    }
}

/// A file found for a request, before its contents are read.
struct Found {
    tag: String,
    modified: Option<SystemTime>,
    content_type: HeaderValue,
    contents: Contents,
}

enum Contents {
    Disk(PathBuf),
    Memory(Bytes),
}

impl StaticFiles {
    /// Serves `folder`; an error names the folder and what is wrong with it.
    pub fn new(folder: &Path) -> Result<StaticFiles, String> {
        let root = folder
            .canonicalize()
            .map_err(|e| format!("static_dir {}: {e}", folder.display()))?;
        if !root.is_dir() {
            return Err(format!("static_dir {} is not a folder", folder.display()));
        }
        Ok(StaticFiles::Folder(root))
    }

    /// The answer to a `GET` or `HEAD` of `path` (the request path, still percent-encoded).
    pub async fn answer(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Response<Full<Bytes>> {
        if method != Method::GET && method != Method::HEAD {
            let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "use GET or HEAD\n");
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        let Some(found) = self.find(path).await else {
            return plain(StatusCode::NOT_FOUND, "not found\n");
        };
        let mut response = if not_modified(headers, &found.tag, found.modified) {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            response
        } else {
            let contents = match found.contents {
                Contents::Memory(bytes) => bytes,
                Contents::Disk(file) => match tokio::fs::read(&file).await {
                    Ok(contents) => Bytes::from(contents),
                    Err(_) => return plain(StatusCode::NOT_FOUND, "not found\n"),
                },
            };
            let mut response = Response::new(Full::new(contents));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, found.content_type);
            response
        };
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(&found.tag) {
            headers.insert(header::ETAG, value);
        }
        if let Some(modified) = found.modified
            && let Ok(value) = HeaderValue::from_str(&httpdate::fmt_http_date(modified))
        {
            headers.insert(header::LAST_MODIFIED, value);
        }
        // Revalidate on every use: pages change with deployments, and a 304 is cheap.
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    }

    /// The file `path` names with its validators; `None` answers `404`.
    async fn find(&self, path: &str) -> Option<Found> {
        match self {
            StaticFiles::Embedded(files) => {
                let file = files.find(path)?;
                Some(Found {
                    tag: file.tag.clone(),
                    modified: None,
                    content_type: file.content_type.clone(),
                    contents: Contents::Memory(file.contents.clone()),
                })
            }
            StaticFiles::Folder(root) => {
                let file = resolve(root, path)?;
                let meta = tokio::fs::metadata(&file).await.ok()?;
                if !meta.is_file() || meta.len() > MAX_FILE {
                    return None;
                }
                let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                let mime = mime_guess::from_path(&file).first_or_octet_stream();
                Some(Found {
                    tag: etag(meta.len(), modified),
                    modified: Some(modified),
                    content_type: HeaderValue::from_str(mime.essence_str()).ok()?,
                    contents: Contents::Disk(file),
                })
            }
        }
    }
}

/// The file `path` names inside `root`, `index.html` for a folder; `None` when the path
/// leaves the folder or names a hidden file.
fn resolve(root: &Path, path: &str) -> Option<PathBuf> {
    let relative = safe_relative_path(path)?;
    let mut file = root.join(relative);
    if file.is_dir() {
        file.push("index.html");
    }
    // A symbolic link may still point outside the folder.
    let canonical = file.canonicalize().ok()?;
    canonical.starts_with(root).then_some(canonical)
}

/// The request path as a relative file path: percent-decoded, every segment a plain name (no
/// `..`, no hidden names, no separators or NULs inside one); `None` otherwise.
fn safe_relative_path(path: &str) -> Option<PathBuf> {
    let decoded = percent_decode(path)?;
    let mut relative = PathBuf::new();
    for segment in decoded.split('/').filter(|s| !s.is_empty()) {
        if segment.starts_with('.') || segment.contains(['\\', '\0']) {
            return None;
        }
        let mut parts = Path::new(segment).components();
        match (parts.next(), parts.next()) {
            (Some(Component::Normal(name)), None) => relative.push(name),
            _ => return None,
        }
    }
    Some(relative)
}

/// `%XX` escapes decoded; `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = std::str::from_utf8(bytes.get(index + 1..index + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A validator that changes when the file does: its length and modification time.
fn etag(len: u64, modified: SystemTime) -> String {
    let nanos = modified
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("\"{len:x}-{nanos:x}\"")
}

/// Whether the client's copy is current: `If-None-Match` decides when present, else
/// `If-Modified-Since` (HTTP dates have whole seconds).
fn not_modified(headers: &HeaderMap, tag: &str, modified: Option<SystemTime>) -> bool {
    if let Some(tags) = headers.get(header::IF_NONE_MATCH) {
        let tags = tags.to_str().unwrap_or_default();
        return tags
            .split(',')
            .map(|t| t.trim().trim_start_matches("W/"))
            .any(|t| t == tag || t == "*");
    }
    let since = headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    let whole_seconds = |time: SystemTime| {
        time.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    match (since, modified) {
        (Some(since), Some(modified)) => whole_seconds(modified) <= whole_seconds(since),
        _ => false,
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_folder() {
        assert_eq!(safe_relative_path("/"), Some(PathBuf::new()));
        assert_eq!(safe_relative_path("/a/b.js"), Some(PathBuf::from("a/b.js")));
        assert_eq!(
            safe_relative_path("/a%20b.txt"),
            Some(PathBuf::from("a b.txt"))
        );
        for escape in [
            "/../etc/passwd",
            "/a/../../x",
            "/%2e%2e/x",
            "/.env",
            "/a%2f..%2fb",
            "/a%5c..",
            "/%zz",
        ] {
            assert_eq!(safe_relative_path(escape), None, "{escape}");
        }
    }

    #[test]
    fn embedded_files_answer_their_paths_and_index_for_folders() {
        let files = EmbeddedFiles::new()
            .file("/index.html", "home")
            .file("js/app.js", "code")
            .file("/docs/index.html", "docs");
        let body = |path: &str| files.find(path).map(|f| f.contents.clone());
        assert_eq!(body("/"), Some(Bytes::from("home")));
        assert_eq!(body("/index.html"), Some(Bytes::from("home")));
        assert_eq!(body("/js/app.js"), Some(Bytes::from("code")));
        assert_eq!(body("/docs"), Some(Bytes::from("docs")));
        assert_eq!(body("/docs/"), Some(Bytes::from("docs")));
        assert_eq!(body("/js/../index.html"), None);
        assert_eq!(body("/missing.css"), None);
        let js = files.find("/js/app.js").unwrap();
        assert_eq!(js.content_type, "text/javascript");
        assert_ne!(js.tag, files.find("/").unwrap().tag);
    }

    #[test]
    fn revalidation_by_tag_or_date() {
        let modified = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let tag = etag(5, modified);
        let mut headers = HeaderMap::new();
        assert!(!not_modified(&headers, &tag, Some(modified)));
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_str(&tag).unwrap());
        assert!(not_modified(&headers, &tag, Some(modified)));
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert!(!not_modified(&headers, &tag, Some(modified)));
        let mut dated = HeaderMap::new();
        let date = httpdate::fmt_http_date(modified);
        dated.insert(
            header::IF_MODIFIED_SINCE,
            HeaderValue::from_str(&date).unwrap(),
        );
        assert!(not_modified(&dated, &tag, Some(modified)));
        assert!(
            !not_modified(&dated, &tag, None),
            "embedded files revalidate by tag only"
        );
        let later = modified + std::time::Duration::from_secs(5);
        assert!(!not_modified(&dated, &tag, Some(later)));
    }
}

/// No request path names a file outside the folder.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn no_path_leaves_the_folder(path in "(/|%2[eEfF]|%5[cC]|\\.|[a-z]|%00|%)*") {
            if let Some(relative) = safe_relative_path(&path) {
                let plain = |c: Component<'_>| match c {
                    Component::Normal(name) => !name.to_string_lossy().starts_with('.'),
                    _ => false,
                };
                prop_assert!(relative.components().all(plain), "{relative:?}");
            }
        }
    }
}
