//! Image references: where an image comes from, and the digest it may be pinned to.

use std::path::PathBuf;

use crate::error::ImageError;

/// A lower-case hex sha256 of an image's compressed bytes: the cache key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(String);

impl Digest {
    /// Parses `hex` (optionally prefixed `sha256:`), which must be 64 lower- or upper-case hex
    /// digits.
    pub fn parse(text: &str) -> Result<Self, ImageError> {
        let hex = text
            .strip_prefix("sha256:")
            .unwrap_or(text)
            .to_ascii_lowercase();
        if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Digest(hex))
        } else {
            Err(ImageError::BadReference {
                reference: text.to_owned(),
                reason: "a sha256 is 64 hex digits".to_owned(),
            })
        }
    }

    /// From a finished hash.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Self {
        Digest(hex::encode(bytes))
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

/// Where image bytes are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An `http://` or `https://` URL.
    Http(String),
    /// A local file (from a `file://` URL or a path).
    File(PathBuf),
}

/// An image to fetch: its source, the reference as the user wrote it, and an optional pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRequest {
    /// Where the bytes come from.
    pub source: Source,
    /// The key of the reference index: the URL, or `file://` + absolute path.
    pub reference: String,
    /// The digest the compressed bytes must have.
    pub pinned: Option<Digest>,
}

impl ImageRequest {
    /// Parses an http(s) URL, a `file:///` URL or a local path, optionally pinned.
    pub fn parse(reference: &str, sha256: Option<&str>) -> Result<Self, ImageError> {
        let bad = |reason: &str| ImageError::BadReference {
            reference: reference.to_owned(),
            reason: reason.to_owned(),
        };
        let pinned = sha256.map(Digest::parse).transpose()?;
        let source = if reference.starts_with("http://") || reference.starts_with("https://") {
            reqwest::Url::parse(reference).map_err(|error| bad(&error.to_string()))?;
            Source::Http(reference.to_owned())
        } else if let Some(path) = reference.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad("a file URL needs an absolute path (file:///…)"));
            }
            Source::File(PathBuf::from(path))
        } else if reference.contains("://") {
            return Err(bad("only http, https and file URLs are supported"));
        } else if reference.is_empty() {
            return Err(bad("empty reference"));
        } else {
            let path = std::path::absolute(reference).map_err(|error| bad(&error.to_string()))?;
            Source::File(path)
        };
        let reference = match &source {
            Source::Http(url) => url.clone(),
            Source::File(path) => format!("file://{}", path.display()),
        };
        Ok(ImageRequest {
            source,
            reference,
            pinned,
        })
    }

    /// From a task payload's image reference.
    pub fn from_payload(image: &schemas::ImageRef) -> Result<Self, ImageError> {
        Self::parse(image.url(), image.sha256())
    }

    /// Checks a file reference against `policy` (URLs always pass): the file's directory,
    /// with every symbolic link resolved, must lie below one of the allowed directories.
    pub fn check_file_policy(&self, policy: &FilePolicy) -> Result<(), ImageError> {
        let Source::File(path) = &self.source else {
            return Ok(());
        };
        let refuse = |reason: String| ImageError::BadReference {
            reference: self.reference.clone(),
            reason,
        };
        let dirs = match policy {
            FilePolicy::Any => return Ok(()),
            FilePolicy::Within(dirs) if dirs.is_empty() => {
                return Err(refuse(
                    "file images are not allowed here; an operator can allow a directory with \
                     images.fileDirs in the configuration"
                        .into(),
                ))
            }
            FilePolicy::Within(dirs) => dirs,
        };
        let parent = path
            .parent()
            .and_then(|parent| std::fs::canonicalize(parent).ok());
        let allowed = parent.is_some_and(|parent| {
            dirs.iter()
                .filter_map(|dir| std::fs::canonicalize(dir).ok())
                .any(|dir| parent.starts_with(dir))
        });
        if allowed {
            Ok(())
        } else {
            Err(refuse(format!(
                "not below a directory of images.fileDirs ({})",
                dirs.iter()
                    .map(|dir| dir.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    }
}

/// Where `file://` image references (and local paths) may point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilePolicy {
    /// Any file the process can open: a user running their own task locally.
    Any,
    /// Only files below these directories; none at all when the list is empty.
    Within(Vec<PathBuf>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let http = ImageRequest::parse("https://x.example/a.tar.zst", None).unwrap();
        assert_eq!(
            http.source,
            Source::Http("https://x.example/a.tar.zst".into())
        );
        let file = ImageRequest::parse("file:///srv/a.tar.zst", Some(&"AB".repeat(32))).unwrap();
        assert_eq!(file.source, Source::File("/srv/a.tar.zst".into()));
        assert_eq!(file.pinned.unwrap().hex(), "ab".repeat(32));
        assert!(ImageRequest::parse("ftp://x/y", None).is_err());
        assert!(ImageRequest::parse("file://relative", None).is_err());
        assert!(ImageRequest::parse("x", Some("123")).is_err());
    }
}
