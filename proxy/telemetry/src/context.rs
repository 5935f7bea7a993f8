//! Trace context: read from incoming requests (W3C `traceparent`/`tracestate`, B3
//! single header, B3 multi-header) and written into the requests the proxy forwards.
//!
//! Parsing is strict: ids are lowercase hex of the exact length, all-zero ids are
//! invalid, W3C version `ff` is invalid, and a header that fails any rule is ignored
//! as a whole (the next format is tried). A request without a valid context makes the
//! proxy start a new trace.

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// W3C trace context header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// W3C vendor-specific trace state header.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// B3 single header.
pub const B3: HeaderName = HeaderName::from_static("b3");
/// B3 multi-header: trace id.
pub const X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
/// B3 multi-header: span id.
pub const X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
/// B3 multi-header: parent span id.
pub const X_B3_PARENTSPANID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
/// B3 multi-header: sampling decision.
pub const X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
/// B3 multi-header: debug flag (`1` forces sampling).
pub const X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// Longest `tracestate` kept, in bytes. W3C asks propagators to keep at least 512
/// characters and lets them drop longer values; a longer one is dropped, the trace
/// itself continues.
pub const MAX_TRACESTATE_LEN: usize = 512;
/// Most list members a `tracestate` may have (W3C).
pub const MAX_TRACESTATE_MEMBERS: usize = 32;

/// The propagation format an incoming context arrived in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// W3C `traceparent` (+ `tracestate`).
    W3C,
    /// B3 single header `b3`.
    B3Single,
    /// B3 multi-header `x-b3-*`.
    B3Multi,
}

/// One position in a trace: the trace, the current span and the sampling decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// 128-bit trace id; a 64-bit B3 id is held with its upper 8 bytes zero.
    pub trace_id: [u8; 16],
    /// 64-bit span id of the span this context points at.
    pub span_id: [u8; 8],
    /// Whether the trace is sampled (recorded and exported).
    pub sampled: bool,
    /// B3 only: the sender made no sampling decision (`b3: tid-sid` or multi-header
    /// without `x-b3-sampled`). The sampler decides as if there were no parent.
    pub deferred: bool,
    /// B3 only: a sampling decision sent without ids (`b3: 0`, `x-b3-sampled: 0`
    /// alone). The ids are fresh, so a span takes no parent from this context.
    pub decision_only: bool,
    /// The W3C `tracestate` to pass on unchanged, if any.
    pub tracestate: Option<HeaderValue>,
    /// The format the context arrived in; [`inject`] also writes B3 when it was B3.
    pub format: Format,
}

impl TraceContext {
    /// A new trace: fresh random trace and span ids, W3C format.
    pub fn new_root(sampled: bool) -> Self {
        TraceContext {
            trace_id: new_trace_id(),
            span_id: new_span_id(),
            sampled,
            deferred: false,
            decision_only: false,
            tracestate: None,
            format: Format::W3C,
        }
    }

    /// The context of a child span: same trace, tracestate and format, a new span id,
    /// and the given sampling decision (see [`crate::Sampler::decide`]).
    pub fn child(&self, sampled: bool) -> Self {
        TraceContext {
            trace_id: self.trace_id,
            span_id: new_span_id(),
            sampled,
            deferred: false,
            decision_only: false,
            tracestate: self.tracestate.clone(),
            format: self.format,
        }
    }

    /// The context of the proxy's span for a request: a child of `parent` when the
    /// request carried one, else a new trace. `sampled` comes from
    /// [`crate::Sampler::decide`] on the same `parent`.
    pub fn next(parent: Option<&TraceContext>, sampled: bool) -> Self {
        match parent {
            Some(parent) => parent.child(sampled),
            None => TraceContext::new_root(sampled),
        }
    }

    /// The span id a child span records as its parent: this context's span, or `None`
    /// for a decision sent without ids.
    pub fn as_parent(&self) -> Option<[u8; 8]> {
        (!self.decision_only).then_some(self.span_id)
    }

    /// The trace id as 32 lowercase hex characters.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The span id as 16 lowercase hex characters.
    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }
}

/// A random, non-zero 128-bit trace id.
pub fn new_trace_id() -> [u8; 16] {
    loop {
        let id = fastrand::u128(..);
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// A random, non-zero 64-bit span id.
pub fn new_span_id() -> [u8; 8] {
    loop {
        let id = fastrand::u64(..);
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// Reads the trace context of an incoming request: W3C first, then B3 single, then
/// B3 multi-header. `None` when none is present and valid.
///
/// A B3 sampling decision sent alone (`b3: 0`, `x-b3-sampled: 0` without ids) yields
/// a context with fresh ids that carries the decision, so the proxy and the hops
/// after it honour the deny.
pub fn extract(headers: &HeaderMap) -> Option<TraceContext> {
    // Only the formats whose headers are present are parsed.
    let present = Present::scan(headers);
    if present.has(Present::TRACEPARENT) {
        if let Some(ctx) = extract_w3c(headers) {
            return Some(ctx);
        }
    }
    if present.has(Present::B3) {
        if let Some(ctx) = extract_b3_single(headers) {
            return Some(ctx);
        }
    }
    if present.has(Present::B3_MULTI) {
        return extract_b3_multi(headers);
    }
    None
}

/// Which trace headers a message carries, found in one pass over its names:
/// most requests carry none, and a pass costs less than one hashed lookup per
/// format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Present(u8);

impl Present {
    const TRACEPARENT: u8 = 1;
    const TRACESTATE: u8 = 2;
    const B3: u8 = 4;
    const B3_MULTI: u8 = 8;

    fn scan(headers: &HeaderMap) -> Present {
        let mut p = 0;
        for name in headers.keys() {
            // Header names are lowercase.
            let n = name.as_str();
            p |= match n.len() {
                2 if n == "b3" => Self::B3,
                10 if n == "tracestate" => Self::TRACESTATE,
                11 if n == "traceparent" => Self::TRACEPARENT,
                _ if n.starts_with("x-b3-") => Self::B3_MULTI,
                _ => 0,
            };
        }
        Present(p)
    }

    fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
}

/// Writes `ctx` into the headers of a request being forwarded: always `traceparent`
/// (and `tracestate` when the context has one, removing a stale one otherwise); B3
/// headers too when the context arrived as B3 or the request already carries them,
/// so applications reading either format see the same, current span.
pub fn inject(headers: &mut HeaderMap, ctx: &TraceContext) {
    let present = Present::scan(headers);
    // Formatted on the stack: this runs for every request, sampled or not.
    let mut trace = [0u8; 32];
    hex_into(&mut trace, &ctx.trace_id);
    let mut span = [0u8; 16];
    hex_into(&mut span, &ctx.span_id);

    let mut traceparent = [0u8; 55];
    traceparent[..3].copy_from_slice(b"00-");
    traceparent[3..35].copy_from_slice(&trace);
    traceparent[35] = b'-';
    traceparent[36..52].copy_from_slice(&span);
    traceparent[52..].copy_from_slice(if ctx.sampled { b"-01" } else { b"-00" });
    if let Ok(value) = HeaderValue::from_bytes(&traceparent) {
        headers.insert(TRACEPARENT, unindexed(value));
    }
    match &ctx.tracestate {
        Some(state) => {
            headers.insert(TRACESTATE, state.clone());
        }
        None if present.has(Present::TRACESTATE) => {
            headers.remove(TRACESTATE);
        }
        None => {}
    }

    // B3 may carry 64-bit trace ids: keep them 64-bit for applications that expect it.
    let b3_trace: &[u8] = if ctx.trace_id[..8] == [0; 8] {
        &trace[16..]
    } else {
        &trace
    };
    let sampled: &[u8; 1] = if ctx.sampled { b"1" } else { b"0" };
    if ctx.format == Format::B3Single || present.has(Present::B3) {
        let mut b3 = [0u8; 32 + 1 + 16 + 2];
        let n = b3_trace.len();
        b3[..n].copy_from_slice(b3_trace);
        b3[n] = b'-';
        b3[n + 1..n + 17].copy_from_slice(&span);
        b3[n + 17] = b'-';
        b3[n + 18] = sampled[0];
        if let Ok(value) = HeaderValue::from_bytes(&b3[..n + 19]) {
            headers.insert(B3, unindexed(value));
        }
    }
    if ctx.format == Format::B3Multi
        || (present.has(Present::B3_MULTI) && headers.contains_key(X_B3_TRACEID))
    {
        if let Ok(value) = HeaderValue::from_bytes(b3_trace) {
            headers.insert(X_B3_TRACEID, unindexed(value));
        }
        if let Ok(value) = HeaderValue::from_bytes(&span) {
            headers.insert(X_B3_SPANID, unindexed(value));
        }
        headers.insert(
            X_B3_SAMPLED,
            HeaderValue::from_static(if ctx.sampled { "1" } else { "0" }),
        );
        // The parent id the caller sent is now the grandparent's: drop it. The debug
        // flag is carried as `sampled`.
        headers.remove(X_B3_PARENTSPANID);
        headers.remove(X_B3_FLAGS);
    }
}

/// A value new with every request (a span id): HTTP/2 sends it as a literal
/// never indexed, so HPACK's dynamic table is not churned by values that never
/// repeat (each would evict entries that do, such as `:authority`).
fn unindexed(mut value: HeaderValue) -> HeaderValue {
    value.set_sensitive(true);
    value
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Writes the lowercase hex of `bytes` into `out` (twice as long).
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX_DIGITS[usize::from(b >> 4)];
        pair[1] = HEX_DIGITS[usize::from(b & 0x0f)];
    }
}

/// Lowercase hex of `bytes` (the workspace's one helper).
pub use remora_proto::util::hex;

/// The one value of a header that must appear at most once.
fn single<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<Result<&'a str, ()>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return Some(Err(()));
    }
    Some(first.to_str().map_err(|_| ()))
}

fn extract_w3c(headers: &HeaderMap) -> Option<TraceContext> {
    let value = single(headers, &TRACEPARENT)?.ok()?;
    let (trace_id, span_id, sampled) = parse_traceparent(value)?;
    Some(TraceContext {
        trace_id,
        span_id,
        sampled,
        deferred: false,
        decision_only: false,
        tracestate: tracestate(headers),
        format: Format::W3C,
    })
}

/// `version-traceid-parentid-flags`, per W3C Trace Context level 1.
fn parse_traceparent(value: &str) -> Option<([u8; 16], [u8; 8], bool)> {
    let b = value.as_bytes();
    if b.len() < 55 {
        return None;
    }
    let version = decode_hex::<1>(&value[..2])?[0];
    if version == 0xff {
        return None;
    }
    // Version 00 is exactly 55 characters; a later version may append fields after
    // a '-', which this parser ignores.
    if (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
        return None;
    }
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let trace_id = decode_hex::<16>(&value[3..35])?;
    let span_id = decode_hex::<8>(&value[36..52])?;
    let flags = decode_hex::<1>(&value[53..55])?[0];
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some((trace_id, span_id, flags & 0x01 == 0x01))
}

/// All `tracestate` headers joined by ',', when the result is valid and short enough.
fn tracestate(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut values = headers.get_all(TRACESTATE).iter();
    let first = values.next()?;
    let value = match values.next() {
        None => first.clone(),
        Some(second) => {
            let mut joined = Vec::with_capacity(MAX_TRACESTATE_LEN);
            joined.extend_from_slice(first.as_bytes());
            for v in std::iter::once(second).chain(values) {
                joined.push(b',');
                joined.extend_from_slice(v.as_bytes());
                if joined.len() > MAX_TRACESTATE_LEN {
                    return None;
                }
            }
            HeaderValue::from_bytes(&joined).ok()?
        }
    };
    valid_tracestate(value.to_str().ok()?).then_some(value)
}

fn valid_tracestate(s: &str) -> bool {
    if s.len() > MAX_TRACESTATE_LEN {
        return false;
    }
    let mut members = 0;
    for member in s.split(',') {
        let member = member.trim_matches(|c| c == ' ' || c == '\t');
        if member.is_empty() {
            continue; // empty list members are allowed and ignored
        }
        members += 1;
        if members > MAX_TRACESTATE_MEMBERS {
            return false;
        }
        let Some((key, value)) = member.split_once('=') else {
            return false;
        };
        if !valid_tracestate_key(key) || !valid_tracestate_value(value) {
            return false;
        }
    }
    members > 0
}

fn valid_tracestate_key(key: &str) -> bool {
    let key_char = |c: u8| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-' | b'*' | b'/')
    };
    let part_ok = |p: &str, max: usize| {
        let b = p.as_bytes();
        !b.is_empty()
            && b.len() <= max
            && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
            && b.iter().all(|&c| key_char(c))
    };
    match key.split_once('@') {
        None => part_ok(key, 256),
        Some((tenant, system)) => part_ok(tenant, 241) && part_ok(system, 14),
    }
}

fn valid_tracestate_value(value: &str) -> bool {
    let b = value.as_bytes();
    !b.is_empty()
        && b.len() <= 256
        && b.iter()
            .all(|&c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
        && b[b.len() - 1] != b' '
}

/// `{traceid}-{spanid}[-{sampling}[-{parentspanid}]]`, or a sampling state alone.
fn extract_b3_single(headers: &HeaderMap) -> Option<TraceContext> {
    let value = single(headers, &B3)?.ok()?;
    if let Some(sampled) = b3_sampling_state(value) {
        return Some(decision_only(sampled, Format::B3Single));
    }
    let mut parts = value.split('-');
    let trace_id = parse_b3_trace_id(parts.next()?)?;
    let span_id = parse_b3_span_id(parts.next()?)?;
    let (sampled, deferred) = match parts.next() {
        None => (false, true),
        Some(state) => (b3_sampling_state(state)?, false),
    };
    if let Some(parent) = parts.next() {
        parse_b3_span_id(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(TraceContext {
        trace_id,
        span_id,
        sampled,
        deferred,
        decision_only: false,
        tracestate: None,
        format: Format::B3Single,
    })
}

fn extract_b3_multi(headers: &HeaderMap) -> Option<TraceContext> {
    let flags_debug = match single(headers, &X_B3_FLAGS) {
        None => false,
        Some(Ok("1")) => true,
        Some(Ok("0")) => false,
        Some(_) => return None,
    };
    let sampled = match single(headers, &X_B3_SAMPLED) {
        None => None,
        Some(Ok("1" | "true")) => Some(true),
        Some(Ok("0" | "false")) => Some(false),
        Some(_) => return None,
    };
    let sampled = if flags_debug { Some(true) } else { sampled };
    let Some(trace) = single(headers, &X_B3_TRACEID) else {
        // No ids: a decision alone, or nothing at all.
        if headers.contains_key(X_B3_SPANID) {
            return None;
        }
        return sampled.map(|s| decision_only(s, Format::B3Multi));
    };
    let trace_id = parse_b3_trace_id(trace.ok()?)?;
    let span_id = parse_b3_span_id(single(headers, &X_B3_SPANID)?.ok()?)?;
    if let Some(parent) = single(headers, &X_B3_PARENTSPANID) {
        parse_b3_span_id(parent.ok()?)?;
    }
    Some(TraceContext {
        trace_id,
        span_id,
        sampled: sampled.unwrap_or(false),
        deferred: sampled.is_none(),
        decision_only: false,
        tracestate: None,
        format: Format::B3Multi,
    })
}

/// `0` deny, `1` accept, `d` debug (sampled).
fn b3_sampling_state(s: &str) -> Option<bool> {
    match s {
        "0" => Some(false),
        "1" | "d" => Some(true),
        _ => None,
    }
}

fn decision_only(sampled: bool, format: Format) -> TraceContext {
    TraceContext {
        format,
        decision_only: true,
        ..TraceContext::new_root(sampled)
    }
}

/// 16 or 32 lowercase hex characters, not all zero.
fn parse_b3_trace_id(s: &str) -> Option<[u8; 16]> {
    let id = match s.len() {
        32 => decode_hex::<16>(s)?,
        16 => {
            let low = decode_hex::<8>(s)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            id
        }
        _ => return None,
    };
    (id != [0; 16]).then_some(id)
}

/// 16 lowercase hex characters, not all zero.
fn parse_b3_span_id(s: &str) -> Option<[u8; 8]> {
    let id = decode_hex::<8>(s)?;
    (id != [0; 8]).then_some(id)
}

/// Exactly `2 * N` lowercase hex characters.
fn decode_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}
