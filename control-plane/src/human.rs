//! How the control plane shows values to people, the same way in the CLI's
//! tables and in the server's messages: sizes, Unix times as RFC 3339 (by
//! `humantime`), short signer ids, use counts, and documents as YAML.

use std::time::{Duration, UNIX_EPOCH};

/// A size for people: `512 B`, `64.0 KiB`, `10.0 MiB`.
pub fn bytes(n: usize) -> String {
    // Sizes shown with one decimal: precision is not the point.
    #[allow(clippy::cast_precision_loss)]
    let f = n as f64;
    if n < 1024 {
        format!("{n} B")
    } else if n < 1024 * 1024 {
        format!("{:.1} KiB", f / 1024.0)
    } else {
        format!("{:.1} MiB", f / (1024.0 * 1024.0))
    }
}

/// A Unix time in seconds as RFC 3339, or `none` for 0 and below.
pub fn unix_time_or(secs: i64, none: &str) -> String {
    match u64::try_from(secs) {
        Ok(s) if s > 0 => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s)).to_string()
        }
        _ => none.to_string(),
    }
}

/// A Unix time in milliseconds as RFC 3339 (whole seconds), or `-` before
/// the epoch.
pub fn unix_ms(unix_ms: i64) -> String {
    let Ok(ms) = u64::try_from(unix_ms) else {
        return "-".into();
    };
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// The first 12 hex characters of a signer id (or a serial).
pub fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// A token's uses: `used/max`, or `used/-` without a limit (`max` 0).
pub fn uses(used: u32, max: u32) -> String {
    if max == 0 {
        format!("{used}/-")
    } else {
        format!("{used}/{max}")
    }
}

/// Documents as YAML, in the order given, separated by `---`.
pub fn yaml<'a>(docs: impl IntoIterator<Item = &'a serde_json::Value>) -> String {
    docs.into_iter()
        .map(|doc| {
            serde_yaml_ng::to_string(doc).unwrap_or_else(|e| format!("# unrenderable: {e}\n"))
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_as_people_expect() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(64 * 1024), "64.0 KiB");
        assert_eq!(bytes(10 * 1024 * 1024), "10.0 MiB");
        assert_eq!(unix_time_or(0, "never"), "never");
        assert_eq!(unix_time_or(86_400, "never"), "1970-01-02T00:00:00Z");
        assert_eq!(unix_ms(86_400_999), "1970-01-02T00:00:00Z");
        assert_eq!(unix_ms(-1), "-");
        assert_eq!(short("0123456789abcdef"), "0123456789ab");
        assert_eq!(short("abc"), "abc");
        assert_eq!((uses(1, 0), uses(2, 3)), ("1/-".into(), "2/3".into()));
        let docs = [serde_json::json!({"a": 1}), serde_json::json!({"b": 2})];
        assert_eq!(yaml(&docs), "a: 1\n---\nb: 2\n");
    }
}
