//! Static files for plain `GET`s (`[server] static_dir`): the pages of an application served
//! beside its WebSockets on the same listener. `index.html` answers a folder, the content type
//! follows the extension, `ETag` and `Last-Modified` let browsers revalidate (`304`), `HEAD`
//! answers the headers only. A path that would leave the folder, hidden files and anything
//! that is not a readable regular file get `404`.

use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::Full;

/// Files larger than this are not served (the relay is not a file server).
const MAX_FILE: u64 = 32 << 20;

/// A folder whose files answer plain `GET`s.
#[derive(Debug, Clone)]
pub(crate) struct StaticFiles {
    /// The folder, canonical, so that nothing outside it can be named.
    root: PathBuf,
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
        Ok(StaticFiles { root })
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
        let Some(file) = self.resolve(path) else {
            return plain(StatusCode::NOT_FOUND, "not found\n");
        };
        let Ok(meta) = tokio::fs::metadata(&file).await else {
            return plain(StatusCode::NOT_FOUND, "not found\n");
        };
        if !meta.is_file() || meta.len() > MAX_FILE {
            return plain(StatusCode::NOT_FOUND, "not found\n");
        }
        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        let tag = etag(meta.len(), modified);
        let mut response = if not_modified(headers, &tag, modified) {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            response
        } else {
            let Ok(contents) = tokio::fs::read(&file).await else {
                return plain(StatusCode::NOT_FOUND, "not found\n");
            };
            let mut response = Response::new(Full::new(Bytes::from(contents)));
            let mime = mime_guess::from_path(&file).first_or_octet_stream();
            if let Ok(value) = HeaderValue::from_str(mime.essence_str()) {
                response.headers_mut().insert(header::CONTENT_TYPE, value);
            }
            response
        };
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(&tag) {
            headers.insert(header::ETAG, value);
        }
        if let Ok(value) = HeaderValue::from_str(&httpdate::fmt_http_date(modified)) {
            headers.insert(header::LAST_MODIFIED, value);
        }
        // Revalidate on every use: pages change with deployments, and a 304 is cheap.
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    }

    /// The file `path` names inside the folder, `index.html` for a folder; `None` when the
    /// path leaves the folder or names a hidden file.
    fn resolve(&self, path: &str) -> Option<PathBuf> {
        let relative = safe_relative_path(path)?;
        let mut file = self.root.join(relative);
        if file.is_dir() {
            file.push("index.html");
        }
        // A symbolic link may still point outside the folder.
        let canonical = file.canonicalize().ok()?;
        canonical.starts_with(&self.root).then_some(canonical)
    }
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
fn not_modified(headers: &HeaderMap, tag: &str, modified: SystemTime) -> bool {
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
    since.is_some_and(|since| whole_seconds(modified) <= whole_seconds(since))
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
    fn revalidation_by_tag_or_date() {
        let modified = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let tag = etag(5, modified);
        let mut headers = HeaderMap::new();
        assert!(!not_modified(&headers, &tag, modified));
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_str(&tag).unwrap());
        assert!(not_modified(&headers, &tag, modified));
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert!(!not_modified(&headers, &tag, modified));
        let mut dated = HeaderMap::new();
        let date = httpdate::fmt_http_date(modified);
        dated.insert(
            header::IF_MODIFIED_SINCE,
            HeaderValue::from_str(&date).unwrap(),
        );
        assert!(not_modified(&dated, &tag, modified));
        let later = modified + std::time::Duration::from_secs(5);
        assert!(!not_modified(&dated, &tag, later));
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
