//! Deadlines and the `grpc-timeout` header, issue 4 §1: an incoming `grpc-timeout` is
//! honoured, and what is left of the deadline is passed on to the upstream.
//!
//! The header is `TimeoutValue TimeoutUnit`: one to eight ASCII digits followed by `H`
//! (hours), `M` (minutes), `S` (seconds), `m` (milliseconds), `u` (microseconds) or `n`
//! (nanoseconds), per the gRPC over HTTP/2 spec.

use std::time::Duration;

use http::header::HeaderName;
use http::HeaderValue;
use tokio::time::Instant;

/// The `grpc-timeout` header name.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

const MAX_DIGITS: usize = 8;
const MAX_VALUE: u64 = 99_999_999;

/// Units from the finest to the coarsest, with their length in nanoseconds.
const UNITS: [(u8, u64); 6] = [
    (b'n', 1),
    (b'u', 1_000),
    (b'm', 1_000_000),
    (b'S', 1_000_000_000),
    (b'M', 60_000_000_000),
    (b'H', 3_600_000_000_000),
];

/// Parses a `grpc-timeout` value; `None` if it is malformed (no digits, more than eight,
/// or an unknown unit), which callers treat as "no timeout sent".
pub fn parse_grpc_timeout(value: &HeaderValue) -> Option<Duration> {
    let bytes = value.as_bytes();
    let (&unit, digits) = bytes.split_last()?;
    if digits.is_empty() || digits.len() > MAX_DIGITS || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount = digits
        .iter()
        .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
    let &(_, unit_nanos) = UNITS.iter().find(|(u, _)| *u == unit)?;
    // 99,999,999 hours is about 3.6e20 ns: compute in u128 and build from seconds.
    let nanos = u128::from(amount) * u128::from(unit_nanos);
    let secs = u64::try_from(nanos / 1_000_000_000).ok()?;
    Some(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

/// Formats `timeout` for `grpc-timeout` in the finest unit whose value fits in eight
/// digits, rounding up (so a tiny remainder never becomes `0`, as gRPC's own
/// implementations do). Beyond 99,999,999 hours it is capped there.
pub fn format_grpc_timeout(timeout: Duration) -> HeaderValue {
    let nanos = timeout.as_nanos();
    for (unit, unit_nanos) in UNITS {
        let amount = nanos.div_ceil(u128::from(unit_nanos));
        if amount <= u128::from(MAX_VALUE) {
            let mut buf = [0u8; MAX_DIGITS + 1];
            let len = write_digits(amount as u64, &mut buf);
            buf[len] = unit;
            if let Ok(value) = HeaderValue::from_bytes(&buf[..=len]) {
                return value;
            }
        }
    }
    HeaderValue::from_static("99999999H")
}

/// Writes `n` (≤ 99,999,999) as decimal digits at the start of `buf`; returns the length.
fn write_digits(mut n: u64, buf: &mut [u8; MAX_DIGITS + 1]) -> usize {
    let mut tmp = [0u8; MAX_DIGITS];
    let mut len = 0;
    loop {
        tmp[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 || len == MAX_DIGITS {
            break;
        }
    }
    for (i, d) in tmp[..len].iter().rev().enumerate() {
        buf[i] = *d;
    }
    len
}

/// The timeout that applies to a request: the smaller of the route's timeout and the
/// one the client sent (`grpc-timeout`), `None` if neither is set.
pub fn effective_deadline(route: Option<Duration>, incoming: Option<Duration>) -> Option<Duration> {
    match (route, incoming) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A request's deadline as a point in time, so each attempt and the upstream's
/// `grpc-timeout` see what is left of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline {
    at: Instant,
}

impl Deadline {
    /// The deadline `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        let now = Instant::now();
        Self {
            at: now
                .checked_add(timeout)
                .unwrap_or(now + Duration::from_secs(86_400 * 365 * 30)),
        }
    }

    /// The deadline for a request, from [`effective_deadline`]'s inputs; `None` if neither
    /// the route nor the client set one.
    pub fn for_request(route: Option<Duration>, incoming: Option<Duration>) -> Option<Self> {
        effective_deadline(route, incoming).map(Self::after)
    }

    /// The instant it falls, for `tokio::time::sleep_until` / `timeout_at`.
    pub fn instant(&self) -> Instant {
        self.at
    }

    /// Time left (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Whether it has passed.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.at
    }

    /// The timeout for one attempt: the per-try timeout if it ends first, else what is left.
    pub fn attempt_timeout(&self, per_try: Option<Duration>) -> Duration {
        let left = self.remaining();
        per_try.map_or(left, |p| p.min(left))
    }

    /// What is left, formatted for the upstream's `grpc-timeout` header.
    pub fn grpc_timeout(&self) -> HeaderValue {
        format_grpc_timeout(self.remaining())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Option<Duration> {
        parse_grpc_timeout(&HeaderValue::from_str(s).unwrap())
    }

    fn format(d: Duration) -> String {
        format_grpc_timeout(d).to_str().unwrap().to_owned()
    }

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse("2H"), Some(Duration::from_secs(7_200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("1500u"), Some(Duration::from_micros(1_500)));
        assert_eq!(parse("7n"), Some(Duration::from_nanos(7)));
        assert_eq!(parse("0m"), Some(Duration::ZERO));
        assert_eq!(parse("00000001S"), Some(Duration::from_secs(1)));
        assert_eq!(
            parse("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3_600))
        );
    }

    #[test]
    fn refuses_malformed_values() {
        for bad in [
            "",
            "S",
            "10",
            "123456789S",
            "10s",
            "10X",
            "-1S",
            "1.5S",
            " 1S",
            "1S ",
            "1 S",
            "+1S",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn formats_in_the_finest_unit_that_fits() {
        assert_eq!(format(Duration::ZERO), "0n");
        assert_eq!(format(Duration::from_nanos(99_999_999)), "99999999n");
        assert_eq!(format(Duration::from_millis(100)), "100000u");
        assert_eq!(format(Duration::from_secs(1)), "1000000u");
        assert_eq!(format(Duration::from_secs(100)), "100000m");
        assert_eq!(format(Duration::from_secs(100_000)), "100000S");
        assert_eq!(format(Duration::from_secs(100_000_000)), "1666667M");
        assert_eq!(format(Duration::from_secs(99_999_999 * 60 + 1)), "1666667H");
        assert_eq!(format(Duration::MAX), "99999999H");
    }

    #[test]
    fn formatting_rounds_up() {
        // 100 ms + 1 ns does not fit in ns; in µs it rounds up to 100001.
        assert_eq!(format(Duration::new(0, 100_000_001)), "100001u");
        assert_eq!(format(Duration::new(100, 1)), "100001m");
    }

    #[test]
    fn round_trips_never_shorten() {
        for d in [
            Duration::from_nanos(1),
            Duration::from_millis(1),
            Duration::new(3, 141_592_653),
            Duration::from_secs(86_400),
            Duration::new(123_456, 789),
        ] {
            let back = parse_grpc_timeout(&format_grpc_timeout(d)).unwrap();
            assert!(back >= d, "{d:?} -> {back:?}");
            // A unit step is at most 1,000× (or 60×) the previous, so rounding costs < 1e-5.
            assert!(
                back - d <= d / 10_000 + Duration::from_nanos(1),
                "{d:?} -> {back:?}"
            );
        }
    }

    #[test]
    fn effective_deadline_is_the_smaller() {
        let s = Duration::from_secs;
        assert_eq!(effective_deadline(Some(s(2)), Some(s(1))), Some(s(1)));
        assert_eq!(effective_deadline(Some(s(2)), Some(s(5))), Some(s(2)));
        assert_eq!(effective_deadline(None, Some(s(5))), Some(s(5)));
        assert_eq!(effective_deadline(Some(s(2)), None), Some(s(2)));
        assert_eq!(effective_deadline(None, None), None);
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_counts_down() {
        let d = Deadline::for_request(Some(Duration::from_secs(2)), parse("1500m")).unwrap();
        assert_eq!(d.remaining(), Duration::from_millis(1_500));
        assert_eq!(
            d.attempt_timeout(Some(Duration::from_millis(500))),
            Duration::from_millis(500)
        );
        tokio::time::advance(Duration::from_millis(1_200)).await;
        assert_eq!(
            d.attempt_timeout(Some(Duration::from_millis(500))),
            Duration::from_millis(300)
        );
        assert_eq!(d.grpc_timeout(), "300000u");
        assert!(!d.is_expired());
        tokio::time::advance(Duration::from_millis(300)).await;
        assert!(d.is_expired());
        assert_eq!(d.remaining(), Duration::ZERO);
        assert_eq!(d.grpc_timeout(), "0n");
        assert!(Deadline::for_request(None, None).is_none());
    }
}
