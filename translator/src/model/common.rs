//! Field types shared by several Istio kinds.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration as StdDuration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::diagnostic::Findings;

/// The largest `google.protobuf.Duration` (its `seconds` field's documented range).
pub const MAX_PROTO_DURATION_SECS: u64 = 315_576_000_000;

/// A duration as Istio accepts it in YAML: Go-style (`1h`, `1m30s`, `250ms`, `1.5s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub StdDuration);

impl Duration {
    /// Parses a Go/protobuf duration string.
    pub fn parse(text: &str) -> Result<Self, String> {
        let s = text.trim();
        if s.is_empty() {
            return Err("empty duration".into());
        }
        if s == "0" {
            return Ok(Self(StdDuration::ZERO));
        }
        let mut total = 0f64;
        let mut rest = s;
        while !rest.is_empty() {
            let num_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(|| format!("duration {text:?} has a number without a unit (use e.g. 10s, 250ms, 1m)"))?;
            if num_len == 0 {
                return Err(format!("duration {text:?} is not of the form 10s, 250ms, 1m30s"));
            }
            let value: f64 =
                rest[..num_len].parse().map_err(|_| format!("duration {text:?} has a malformed number"))?;
            rest = &rest[num_len..];
            let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
            let scale = match &rest[..unit_len] {
                "ns" => 1e-9,
                "us" | "µs" => 1e-6,
                "ms" => 1e-3,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                other => return Err(format!("duration {text:?} has unknown unit {other:?} (ns, us, ms, s, m, h)")),
            };
            rest = &rest[unit_len..];
            total += value * scale;
        }
        if total > MAX_PROTO_DURATION_SECS as f64 {
            return Err(format!(
                "duration {text:?} is out of range: protobuf durations end at {MAX_PROTO_DURATION_SECS}s (10000 years)"
            ));
        }
        StdDuration::try_from_secs_f64(total).map(Self).map_err(|e| format!("duration {text:?} is out of range: {e}"))
    }

    /// The protobuf JSON form Envoy reads (`"1.500s"`).
    pub fn to_proto_json(&self) -> String {
        let secs = self.0.as_secs();
        let nanos = self.0.subsec_nanos();
        if nanos == 0 {
            format!("{secs}s")
        } else if nanos.is_multiple_of(1_000_000) {
            format!("{secs}.{:03}s", nanos / 1_000_000)
        } else {
            format!("{secs}.{nanos:09}s")
        }
    }

    /// Whole milliseconds.
    pub fn as_millis(&self) -> u128 {
        self.0.as_millis()
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_proto_json())
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Duration::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        // As protobuf's JSON mapping writes a Duration: "1.5s".
        schemars::json_schema!({"type": "string", "description": "A duration such as \"1.5s\" or \"100ms\"."})
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_proto_json())
    }
}

/// Istio's `StringMatch`: exactly one of exact, prefix or regex.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StringMatch {
    /// Exact string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// Prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// RE2 regular expression, matched against the whole value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// The single alternative a valid [`StringMatch`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchKind<'a> {
    /// Exact string.
    Exact(&'a str),
    /// Prefix.
    Prefix(&'a str),
    /// Regular expression.
    Regex(&'a str),
}

impl StringMatch {
    /// The one alternative set, if exactly one is.
    pub fn kind(&self) -> Option<MatchKind<'_>> {
        match (&self.exact, &self.prefix, &self.regex) {
            (Some(e), None, None) => Some(MatchKind::Exact(e)),
            (None, Some(p), None) => Some(MatchKind::Prefix(p)),
            (None, None, Some(r)) => Some(MatchKind::Regex(r)),
            _ => None,
        }
    }

    /// Checks that exactly one alternative is set and that a regex compiles under RE2 rules.
    pub fn validate(&self, path: &str, findings: &mut Findings) {
        match self.kind() {
            None => findings.error(path, "exactly one of exact, prefix or regex must be set"),
            Some(MatchKind::Regex(r)) => validate_regex(&format!("{path}.regex"), r, findings),
            Some(_) => {}
        }
    }
}

/// Checks a regular expression the way Envoy's RE2 engine would accept it. Rust's `regex` crate
/// implements the same syntax family (no backreferences, no look-around), so what it rejects RE2
/// rejects too, for the constructs users write in routes.
pub fn validate_regex(path: &str, regex: &str, findings: &mut Findings) {
    if let Err(e) = regex::Regex::new(regex) {
        let reason = e.to_string().lines().last().unwrap_or_default().to_string();
        findings.error(path, format!("regex {regex:?} does not compile under RE2 rules: {reason}"));
        return;
    }
    let size = re2_program_size(regex);
    if size > RE2_MAX_PROGRAM_SIZE {
        findings.error(
            path,
            format!(
                "regex {regex:?} compiles to about {size} RE2 instructions, more than the {RE2_MAX_PROGRAM_SIZE} \
                 Envoy allows (runtime re2.max_program_size.error_level, as Istio sets it)"
            ),
        );
    }
}

/// The RE2 program size Envoy accepts: `sluice bootstrap` sets Envoy's runtime key
/// `re2.max_program_size.error_level` to this, as Istio's bootstrap does (Envoy's own default is
/// 100, which `[a-z]{200}` already exceeds).
pub const RE2_MAX_PROGRAM_SIZE: u64 = 32_768;

/// An upper estimate of the size of the RE2 program `regex` compiles to (RE2 counts
/// instructions: one per byte range of a literal or class, a split per alternative and per
/// optional repetition, two per capture; bounded repetitions are unrolled). Classes are costed
/// as their UTF-8 byte sequences, which RE2 shares in part: the estimate errs on the large side.
pub fn re2_program_size(regex: &str) -> u64 {
    use regex_syntax::hir::{Class, Hir, HirKind};
    fn cost(h: &Hir) -> u64 {
        match h.kind() {
            HirKind::Empty => 1,
            HirKind::Literal(l) => l.0.len() as u64,
            HirKind::Class(Class::Bytes(c)) => c.ranges().len() as u64,
            HirKind::Class(Class::Unicode(c)) => {
                let mut n = 0u64;
                let mut sequences = 0u64;
                for r in c.ranges() {
                    for seq in regex_syntax::utf8::Utf8Sequences::new(r.start(), r.end()) {
                        n += seq.as_slice().len() as u64;
                        sequences += 1;
                    }
                }
                n + sequences.saturating_sub(1)
            }
            HirKind::Look(_) => 1,
            HirKind::Repetition(r) => {
                let sub = cost(&r.sub);
                let min = u64::from(r.min);
                let optional = match r.max {
                    Some(max) => u64::from(max) - min,
                    None => 1,
                };
                sub.saturating_mul(min).saturating_add((sub + 1).saturating_mul(optional))
            }
            HirKind::Capture(c) => cost(&c.sub) + 2,
            HirKind::Concat(parts) => parts.iter().map(cost).fold(0, u64::saturating_add),
            HirKind::Alternation(parts) => {
                parts.iter().map(cost).fold(0, u64::saturating_add).saturating_add(parts.len() as u64 - 1)
            }
        }
    }
    // RE2 adds its start, match and fail instructions around the pattern.
    regex_syntax::parse(regex).map_or(u64::MAX, |hir| cost(&hir).saturating_add(4))
}

/// A label selector by exact labels (Istio's `WorkloadSelector`, field `labels`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels a workload must carry, all of them.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `matchLabels`-style selector used by the security kinds.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels a workload must carry, all of them.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// True when `labels` carries every `selector` label with the same value.
pub fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A percentage (0–100) as Istio's `Percent`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
pub struct Percent {
    /// The value, 0.0–100.0.
    #[serde(default)]
    pub value: f64,
}

/// Checks a percentage is within 0–100.
pub fn validate_percent(path: &str, value: f64, findings: &mut Findings) {
    if !(0.0..=100.0).contains(&value) || value.is_nan() {
        findings.error(path, format!("percentage {value} must be between 0 and 100"));
    }
}

/// A port reference: `port: {number: 9080}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
pub struct PortSelector {
    /// The port number.
    #[serde(default)]
    pub number: u32,
}

/// Checks a port number is in 1–65535.
pub fn validate_port(path: &str, port: u32, findings: &mut Findings) {
    if !(1..=65535).contains(&port) {
        findings.error(path, format!("port {port} is out of range 1-65535"));
    }
}

/// Checks an `exportTo` list: `.`, `*`, `~` or a namespace name.
pub fn validate_export_to(path: &str, export_to: &[String], findings: &mut Findings) {
    for (i, e) in export_to.iter().enumerate() {
        if !(e == "." || e == "*" || e == "~" || is_dns1123_label(e)) {
            findings.error(format!("{path}[{i}]"), format!("{e:?} is not '.', '*', '~' or a namespace name"));
        }
    }
    if export_to.len() > 1 && export_to.iter().any(|e| e == "*" || e == "~") {
        findings.error(path, "'*' and '~' cannot be combined with other entries");
    }
}

/// RFC 1123 label: lowercase alphanumerics and '-', at most 63 characters.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A workload selector's labels: Kubernetes label keys and values, without wildcards (Istio
/// selects by exact labels; a `*` would silently select nothing).
pub fn validate_selector(path: &str, labels: &BTreeMap<String, String>, findings: &mut Findings) {
    for (key, value) in labels {
        if key.contains('*') || value.contains('*') {
            findings.error(format!("{path}.{key}"), "wildcard is not supported in a selector");
        }
    }
}

/// A host name as Istio accepts it in `hosts` fields: an FQDN or short name, optionally with a
/// leading `*.` wildcard, or `*` alone.
pub fn validate_host(path: &str, host: &str, allow_wildcard: bool, findings: &mut Findings) {
    if host == "*" {
        if !allow_wildcard {
            findings.error(path, "'*' is not allowed here");
        }
        return;
    }
    let (name, partial) = match host.strip_prefix('*') {
        Some(_) if !allow_wildcard => {
            return findings.error(path, format!("wildcard host {host:?} is not allowed here"));
        }
        Some(rest) => match rest.strip_prefix('.') {
            Some(rest) => (rest, false),
            None => (rest, true),
        },
        None => (host, false),
    };
    if host.len() > 255 {
        return findings.error(path, format!("host {host:?} is longer than 255 characters"));
    }
    if partial {
        // Istio accepts a partial wildcard; it matches by suffix, as Envoy's domains do.
        findings.warn(
            path,
            format!("partial wildcard host {host:?} matches every host that ends in {name:?}, not a DNS subtree"),
        );
    }
    for (i, label) in name.trim_end_matches('.').split('.').enumerate() {
        // The rest of a partial wildcard's first label may start or end with '-'.
        if partial && i == 0 && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && label.len() <= 62 {
            continue;
        }
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return findings.error(path, format!("host {host:?} is not a valid DNS name (label {label:?})"));
        }
    }
}

/// Istio's port protocols (`ServicePort.protocol`, and Kubernetes port name prefixes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// HTTP/1.1 (and HTTP/2 by upgrade).
    Http,
    /// HTTP/2 prior knowledge.
    Http2,
    /// gRPC (HTTP/2).
    Grpc,
    /// TLS passthrough / HTTPS.
    Tls,
    /// Opaque TCP.
    Tcp,
    /// UDP (not proxied by Envoy sidecars).
    Udp,
}

impl Protocol {
    /// Parses Istio's protocol names, case-insensitively.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "http" => Self::Http,
            "http2" | "h2c" => Self::Http2,
            "grpc" | "grpc-web" => Self::Grpc,
            "https" | "tls" => Self::Tls,
            "tcp" | "mongo" | "mysql" | "redis" => Self::Tcp,
            "udp" => Self::Udp,
            _ => return None,
        })
    }

    /// Istio's rule for Kubernetes ports: `appProtocol` if set, else the port name's prefix
    /// before `-` (`http-web` → HTTP). Anything else is TCP here, since sluice does not sniff
    /// protocols.
    pub fn from_kubernetes(name: Option<&str>, app_protocol: Option<&str>, transport: Option<&str>) -> Self {
        if transport == Some("UDP") {
            return Self::Udp;
        }
        if let Some(p) = app_protocol.and_then(|p| Self::parse(p.rsplit('/').next().unwrap_or(p))) {
            return p;
        }
        name.and_then(|n| Self::parse(n.split('-').next().unwrap_or(n))).unwrap_or(Self::Tcp)
    }

    /// True for protocols Envoy handles with the HTTP connection manager.
    pub fn is_http(self) -> bool {
        matches!(self, Self::Http | Self::Http2 | Self::Grpc)
    }

    /// True when the upstream speaks HTTP/2.
    pub fn is_http2(self) -> bool {
        matches!(self, Self::Http2 | Self::Grpc)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Http => "HTTP",
            Self::Http2 => "HTTP2",
            Self::Grpc => "GRPC",
            Self::Tls => "TLS",
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(Duration::parse("10s").unwrap().0, StdDuration::from_secs(10));
        assert_eq!(Duration::parse("250ms").unwrap().0, StdDuration::from_millis(250));
        assert_eq!(Duration::parse("1m30s").unwrap().0, StdDuration::from_secs(90));
        assert_eq!(Duration::parse("1.5s").unwrap().to_proto_json(), "1.500s");
        assert_eq!(Duration::parse("0").unwrap().to_proto_json(), "0s");
        assert!(Duration::parse("10").unwrap_err().contains("without a unit"));
        assert!(Duration::parse("10x").unwrap_err().contains("unknown unit"));
        assert!(Duration::parse("-1s").is_err());
    }

    #[test]
    fn string_match_needs_exactly_one() {
        let mut f = Findings::default();
        StringMatch::default().validate("m", &mut f);
        assert!(f.has_errors());
        let mut f = Findings::default();
        StringMatch { regex: Some("(a".into()), ..Default::default() }.validate("m", &mut f);
        assert!(f.has_errors());
        let mut f = Findings::default();
        StringMatch { regex: Some("(a)\\1".into()), ..Default::default() }.validate("m", &mut f);
        assert!(f.has_errors(), "backreferences are not RE2");
        let mut f = Findings::default();
        StringMatch { prefix: Some("/a".into()), ..Default::default() }.validate("m", &mut f);
        assert!(!f.has_errors());
    }

    #[test]
    fn hosts() {
        for (host, wild, ok) in [
            ("reviews", false, true),
            ("reviews.default.svc.cluster.local", false, true),
            ("*.example.com", true, true),
            ("*.example.com", false, false),
            ("*", true, true),
            ("bad_host", true, false),
            ("-a.b", true, false),
            ("a..b", true, false),
        ] {
            let mut f = Findings::default();
            validate_host("h", host, wild, &mut f);
            assert_eq!(!f.has_errors(), ok, "{host}");
        }
    }

    #[test]
    fn protocol_from_port_names() {
        assert_eq!(Protocol::from_kubernetes(Some("http"), None, None), Protocol::Http);
        assert_eq!(Protocol::from_kubernetes(Some("grpc-api"), None, None), Protocol::Grpc);
        assert_eq!(Protocol::from_kubernetes(Some("web"), None, None), Protocol::Tcp);
        assert_eq!(Protocol::from_kubernetes(Some("web"), Some("http"), None), Protocol::Http);
        assert_eq!(Protocol::from_kubernetes(Some("web"), Some("kubernetes.io/h2c"), None), Protocol::Http2);
        assert_eq!(Protocol::from_kubernetes(Some("dns"), None, Some("UDP")), Protocol::Udp);
    }
}
