//! `--store URL`: where the object store is, and how to reach it.
//!
//! `s3://BUCKET[/PREFIX]` is an S3-compatible bucket, configured the way the AWS tools read it:
//! `AWS_ENDPOINT_URL` (absent: AWS itself), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_REGION` (default `us-east-1`) and `AWS_ALLOW_HTTP` (`true`/`1` for a plain-HTTP endpoint,
//! e.g. a test server on loopback). `file:///DIR` or an absolute path is a directory used as
//! the object store (a shared file system, or tests).

use std::path::PathBuf;

use rootfork_store::{Backend, S3Config};

/// A parsed `--store` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// An S3 bucket and a key prefix (without slashes at either end; may be empty).
    S3 {
        /// The bucket.
        bucket: String,
        /// The prefix every key starts with.
        prefix: String,
    },
    /// A directory.
    Dir(PathBuf),
}

impl StoreUrl {
    /// Parses `s3://BUCKET[/PREFIX]`, `file:///DIR` or `/DIR`.
    pub fn parse(url: &str) -> Result<StoreUrl, String> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty()
                || !bucket
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
            {
                return Err(format!(
                    "{url:?}: not a bucket name (lowercase letters, digits, '-', '.')"
                ));
            }
            let prefix = prefix.trim_matches('/');
            if prefix
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
                && !prefix.is_empty()
            {
                return Err(format!(
                    "{url:?}: the prefix has an empty, '.' or '..' part"
                ));
            }
            return Ok(StoreUrl::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
        let path = url.strip_prefix("file://").unwrap_or(url);
        if path.starts_with('/') {
            return Ok(StoreUrl::Dir(PathBuf::from(path)));
        }
        Err(format!(
            "{url:?}: expected s3://BUCKET/PREFIX, file:///DIR or an absolute path"
        ))
    }

    /// The object store backend and key prefix, the S3 settings read from the environment.
    pub fn backend(&self) -> (Backend, String) {
        match self {
            StoreUrl::Dir(dir) => (Backend::Local(dir.clone()), String::new()),
            StoreUrl::S3 { bucket, prefix } => {
                let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
                let s3 = S3Config {
                    endpoint: var("AWS_ENDPOINT_URL"),
                    bucket: bucket.clone(),
                    region: var("AWS_REGION").unwrap_or_else(|| "us-east-1".into()),
                    access_key_id: var("AWS_ACCESS_KEY_ID").unwrap_or_default(),
                    secret_access_key: var("AWS_SECRET_ACCESS_KEY").unwrap_or_default(),
                    allow_http: var("AWS_ALLOW_HTTP")
                        .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")),
                };
                (Backend::S3(s3), prefix.clone())
            }
        }
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            StoreUrl::Dir(d) => write!(f, "file://{}", d.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_say_why() {
        assert_eq!(
            StoreUrl::parse("s3://b/rf/x/").unwrap(),
            StoreUrl::S3 {
                bucket: "b".into(),
                prefix: "rf/x".into()
            }
        );
        assert_eq!(
            StoreUrl::parse("s3://b").unwrap(),
            StoreUrl::S3 {
                bucket: "b".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            StoreUrl::parse("file:///srv/store").unwrap(),
            StoreUrl::Dir("/srv/store".into())
        );
        assert_eq!(
            StoreUrl::parse("/srv/store").unwrap(),
            StoreUrl::Dir("/srv/store".into())
        );
        for bad in [
            "s3://",
            "s3://Bad_Bucket/x",
            "s3://b/a//c",
            "s3://b/../x",
            "relative/dir",
            "http://x",
        ] {
            assert!(StoreUrl::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            StoreUrl::parse("s3://b/rf").unwrap().to_string(),
            "s3://b/rf"
        );
    }
}
