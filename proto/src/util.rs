//! Small helpers the control plane and the sidecar share: lowercase hex and
//! wall-clock time as Unix seconds or milliseconds (the `int64` timestamps of
//! the `remora.v1` API and of certificates).

use std::time::{SystemTime, UNIX_EPOCH};

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Lowercase hex of `bytes`, two digits a byte.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(HEX_DIGITS[usize::from(b >> 4)]));
        out.push(char::from(HEX_DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// `t` as whole seconds since the Unix epoch: 0 for a time before it, and
/// `i64::MAX` past what an `i64` holds.
pub fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `t` as whole milliseconds since the Unix epoch: 0 for a time before it,
/// and `i64::MAX` past what an `i64` holds.
pub fn unix_millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Now, as Unix seconds ([`unix_secs`]).
pub fn now_unix() -> i64 {
    unix_secs(SystemTime::now())
}

/// Now, as Unix milliseconds ([`unix_millis`]).
pub fn now_unix_ms() -> i64 {
    unix_millis(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn hex_is_lowercase_two_digits_a_byte() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff, 0x12]), "000fa0ff12");
        let all: Vec<u8> = (0..=255).collect();
        let text = hex(&all);
        assert_eq!(text.len(), 512);
        for (i, pair) in text.as_bytes().chunks(2).enumerate() {
            let pair = std::str::from_utf8(pair).unwrap();
            assert_eq!(pair, format!("{i:02x}"));
        }
    }

    #[test]
    fn unix_time_is_whole_units_since_the_epoch_and_never_negative() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_999);
        assert_eq!(unix_secs(t), 1_700_000_000);
        assert_eq!(unix_millis(t), 1_700_000_000_999);
        assert_eq!(unix_secs(UNIX_EPOCH), 0);
        assert_eq!(unix_secs(UNIX_EPOCH - Duration::from_secs(5)), 0);
        assert_eq!(unix_millis(UNIX_EPOCH - Duration::from_secs(5)), 0);
        let far = UNIX_EPOCH + Duration::from_secs(u64::MAX / 2);
        assert_eq!(unix_millis(far), i64::MAX);
    }

    #[test]
    fn now_is_now() {
        let (before, secs, ms) = (SystemTime::now(), now_unix(), now_unix_ms());
        assert!(secs >= unix_secs(before) && secs - unix_secs(before) <= 1);
        assert!(ms >= unix_millis(before) && ms - unix_millis(before) <= 1_000);
        assert!(secs > 1_700_000_000, "a clock after 2023");
    }
}
