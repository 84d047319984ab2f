//! Multi-document YAML (the files one would `kubectl apply`) → typed, individually validated
//! objects. Pure: the caller reads the files.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::diagnostic::{Diagnostic, Findings, ObjectRef, Severity};
use crate::model::{self, IstioObject, Kind, Loaded, Meta, Object};

mod no_positional;
use no_positional::NoPositional;

/// The deepest nesting of collections a document may have. Kubernetes objects, Istio's
/// included, nest a few dozen levels at most; a hostile document of thousands would take the
/// parser seconds, so it is refused before parsing.
pub const MAX_DEPTH: usize = 128;

/// The largest document read: Kubernetes' own limit on a request body (3 MiB).
pub const MAX_DOCUMENT_BYTES: usize = 3 << 20;

/// The most values (scalars and collections) one document may hold. The largest real objects
/// (a ServiceEntry of thousands of endpoints, a policy of thousands of IP blocks) hold tens of
/// thousands; past this a document costs tens of milliseconds and is refused instead.
pub const MAX_NODES: usize = 1 << 17;

/// A file at least this large is parsed on several threads, a share of its documents each.
const PARALLEL_BYTES: usize = 64 << 10;

thread_local! {
    /// Values left in the budget of the document being parsed on this thread.
    static NODES_LEFT: std::cell::Cell<usize> = const { std::cell::Cell::new(MAX_NODES) };
}

/// Takes one value from the document's budget.
fn count_node<E: serde::de::Error>() -> Result<(), E> {
    NODES_LEFT.with(|left| match left.get() {
        0 => Err(E::custom(format!("the document holds more than {MAX_NODES} values"))),
        n => {
            left.set(n - 1);
            Ok(())
        }
    })
}

/// Parses every YAML document in `text` (from `origin`) into objects. Documents that fail to parse
/// or validate are reported and left out; the others are returned. A syntax error rejects the
/// document it is in, not its neighbours: documents are split at their `---` lines first.
pub fn parse_documents(origin: &str, text: &str) -> (Vec<Loaded>, Vec<Diagnostic>) {
    let documents: Vec<(usize, (usize, &str))> = split_documents(text).into_iter().enumerate().collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    if text.len() < PARALLEL_BYTES || threads < 2 || documents.len() < 2 {
        return parse_some(origin, &documents);
    }
    // Documents are independent: each thread parses a contiguous share, and the shares are
    // joined in order, so the result is the one a single thread gives.
    let share = documents.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let parts: Vec<_> = documents.chunks(share).map(|part| scope.spawn(move || parse_some(origin, part))).collect();
        let (mut objects, mut diagnostics) = (Vec::new(), Vec::new());
        for part in parts {
            let (o, d) = part.join().expect("a parsing thread panicked");
            objects.extend(o);
            diagnostics.extend(d);
        }
        (objects, diagnostics)
    })
}

/// [`parse_documents`] for some of a file's documents: (index, (first line, text)).
fn parse_some(origin: &str, documents: &[(usize, (usize, &str))]) -> (Vec<Loaded>, Vec<Diagnostic>) {
    let mut out = Parsed { origin, objects: Vec::new(), diagnostics: Vec::new() };
    for &(index, (line, document)) in documents {
        let where_ = format!("document {index}");
        match parse_yaml(document) {
            Ok(value) => out.document(value, &where_),
            Err(e) => out.diagnostics.push(Diagnostic {
                severity: Severity::Error,
                origin: origin.to_string(),
                object: None,
                path: where_,
                code: None,
                message: format!("invalid YAML (document from line {line}): {e}"),
            }),
        }
    }
    (out.objects, out.diagnostics)
}

/// The documents of a YAML stream with the line each starts at: split at the lines that begin
/// with `---` (a directives end marker, possibly followed by content) or are `...`. Inside a
/// document such a line can only occur indented (block scalars are indented under their key),
/// so splitting at column 0 never cuts a document.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let (mut start, mut start_line) = (0, 1);
    let mut offset = 0;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if marker || bare == "..." {
            out.push((start_line, &text[start..offset]));
            // Content after `--- ` on the same line belongs to the next document.
            start = if marker { offset + 3 } else { offset + line.len() };
            start_line = n + 1 + usize::from(!marker);
        }
        offset += line.len();
    }
    out.push((start_line, &text[start..]));
    out.retain(|(_, d)| !d.trim().is_empty());
    out
}

/// One document as JSON, Kubernetes' way: a duplicate key is an error (naming the key), so is a
/// number JSON cannot hold (`.inf`, `.nan`); too deep or too large a document is refused
/// before it is parsed.
fn parse_yaml(document: &str) -> Result<Value, String> {
    if document.len() > MAX_DOCUMENT_BYTES {
        return Err(format!("the document is {} bytes, more than the {MAX_DOCUMENT_BYTES} read", document.len()));
    }
    prescan(document)?;
    let mut text = std::borrow::Cow::Borrowed(document);
    for _ in 0..MAX_COLON_SCALARS {
        NODES_LEFT.with(|left| left.set(MAX_NODES));
        let de = serde_yaml_ng::Deserializer::from_str(&text);
        match Strict::deserialize(de) {
            Ok(s) => return Ok(s.0),
            Err(e) => {
                let message = e.to_string();
                match colon_scalar(&message).and_then(|(line, column)| quote_scalar(&text, line, column)) {
                    Some(quoted) => text = std::borrow::Cow::Owned(quoted),
                    None => return Err(message),
                }
            }
        }
    }
    Err(format!("more than {MAX_COLON_SCALARS} plain scalars with ':' in flow collections"))
}

/// How many plain scalars with a colon (`[1.2.3.4, 001:db8::]`) one document may have.
const MAX_COLON_SCALARS: usize = 64;

/// Where the plain scalar starts (line and column, from 1) when `message` is libyaml's refusal
/// of a ':' inside a plain scalar of a flow collection. Go's YAML (Kubernetes', so Istio's)
/// reads `[1.2.3.4, 001:db8::]` as two strings; libyaml stops at the colon.
fn colon_scalar(message: &str) -> Option<(usize, usize)> {
    let rest = message.strip_prefix("found unexpected ':'")?;
    let at = rest.split("while scanning a plain scalar at line ").nth(1)?;
    let (line, column) = at.split_once(" column ")?;
    let column: String = column.chars().take_while(char::is_ascii_digit).collect();
    Some((line.parse().ok()?, column.parse().ok()?))
}

/// `text` with the flow-context plain scalar at `line`:`column` single-quoted: it runs to the
/// next `,`, `]`, `}`, ` #` or the end of the line, as Go's YAML reads it.
fn quote_scalar(text: &str, line: usize, column: usize) -> Option<String> {
    let start_of_line: usize = text.split_inclusive('\n').take(line - 1).map(str::len).sum();
    let line_text = text[start_of_line..].split('\n').next()?;
    let start = start_of_line + line_text.char_indices().nth(column - 1)?.0;
    let scalar_text = &text[start..start_of_line + line_text.len()];
    let mut end = scalar_text.len();
    for (i, c) in scalar_text.char_indices() {
        if matches!(c, ',' | ']' | '}') || (c == '#' && scalar_text[..i].ends_with([' ', '\t'])) {
            end = i;
            break;
        }
    }
    let scalar = scalar_text[..end].trim_end();
    if scalar.is_empty() || scalar.starts_with(['\'', '"']) {
        return None;
    }
    let quoted = format!("'{}'", scalar.replace('\'', "''"));
    Some(format!("{}{quoted}{}", &text[..start], &text[start + scalar.len()..]))
}

/// Refuses, before the parser reads it, a document whose flow collections (`[`, `{`) nest
/// deeper than [`MAX_DEPTH`] (outside quotes and comments; block collections nest by
/// indentation, which the line length bounds) or that holds more than [`MAX_NODES`] values by a
/// count that cannot overshoot: the separators of flow collections and the entries of block
/// sequences. The parser reads a whole document before any value is built, so the value
/// budget alone would come too late.
fn prescan(document: &str) -> Result<(), String> {
    let mut depth = 0usize;
    let mut values = 0usize;
    for (n, line) in document.lines().enumerate() {
        if depth == 0 && line.trim_start().starts_with("- ") {
            values += 1;
        }
        // Bytes, not chars: every byte looked for is ASCII, which no byte of a longer UTF-8
        // character can be.
        let mut quote: Option<u8> = None;
        let mut previous = b' ';
        for c in line.bytes() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, b'\'' | b'"') => quote = Some(c),
                (None, b'#') if matches!(previous, b' ' | b'\t') => break,
                (None, b'[' | b'{') => {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        return Err(format!("collections nest more than {MAX_DEPTH} deep (at line {})", n + 1));
                    }
                }
                (None, b']' | b'}') => depth = depth.saturating_sub(1),
                (None, b',') if depth > 0 => values += 1,
                _ => {}
            }
            previous = c;
        }
        if values > MAX_NODES {
            return Err(format!("the document holds more than {MAX_NODES} values (at line {})", n + 1));
        }
    }
    Ok(())
}

/// A JSON value deserialized strictly (see [`parse_yaml`]).
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        count_node::<D::Error>()?;
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a YAML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom(format!("{v} is not a number Kubernetes can hold (JSON has no infinity or NaN)")))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Strict::deserialize(d).map(|s| s.0)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Strict(value) = map.next_value()?;
            match out.entry(key) {
                serde_json::map::Entry::Occupied(e) => {
                    return Err(serde::de::Error::custom(format!("duplicate key {:?}", e.key())));
                }
                serde_json::map::Entry::Vacant(e) => {
                    e.insert(value);
                }
            }
        }
        Ok(Value::Object(out))
    }
}

/// Parses one object already decoded to JSON (as an API server returns it), exactly as a YAML
/// document of [`parse_documents`] would be.
pub fn parse_value(origin: &str, value: Value) -> (Vec<Loaded>, Vec<Diagnostic>) {
    let mut out = Parsed { origin, objects: Vec::new(), diagnostics: Vec::new() };
    out.document(value, "object");
    (out.objects, out.diagnostics)
}

struct Parsed<'a> {
    origin: &'a str,
    objects: Vec<Loaded>,
    diagnostics: Vec<Diagnostic>,
}

impl Parsed<'_> {
    fn error(&mut self, object: Option<ObjectRef>, path: &str, message: String) {
        self.diagnostics.push(Diagnostic {
            severity: Severity::Error,
            origin: self.origin.to_string(),
            object,
            path: path.to_string(),
            code: None,
            message,
        });
    }

    fn document(&mut self, value: Value, where_: &str) {
        if value.is_null() {
            return;
        }
        let Some(map) = value.as_object() else {
            return self.error(None, where_, "a document must be a mapping with apiVersion and kind".into());
        };
        let api_version = map.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_string();
        let kind = map.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
        // `get`, not `pointer`: a pointer is parsed (and its segments unescaped) on every call.
        let metadata = |field: &str| map.get("metadata").and_then(|m| m.get(field)).and_then(Value::as_str);
        let name = metadata("name").unwrap_or_default().to_string();
        let namespace = metadata("namespace").unwrap_or_default().to_string();
        if kind.is_empty() || api_version.is_empty() {
            let r = (!name.is_empty()).then(|| ObjectRef::new(&kind, &namespace, &name));
            return self.error(r, where_, "apiVersion and kind are required".into());
        }
        // `kubectl get -o yaml` writes lists; read their items as documents of their own.
        if kind.ends_with("List")
            && let Some(items) = map.get("items").and_then(Value::as_array)
        {
            for (i, item) in items.iter().enumerate() {
                self.document(item.clone(), &format!("{where_}.items[{i}]"));
            }
            return;
        }
        let resolved = match Kind::resolve(&api_version, &kind) {
            Ok(Some(k)) => k,
            Ok(None) => {
                self.diagnostics.push(Diagnostic {
                    severity: Severity::Warning,
                    origin: self.origin.to_string(),
                    object: Some(ObjectRef::new(&kind, &namespace, &name)),
                    path: String::new(),
                    code: None,
                    message: format!("kind {kind} ({api_version}) is not read by sluice; skipped"),
                });
                return;
            }
            Err(e) => return self.error(Some(ObjectRef::new(&kind, &namespace, &name)), "apiVersion", e),
        };
        let namespace = if resolved.namespaced() && namespace.is_empty() { "default".to_string() } else { namespace };
        let reference = ObjectRef::new(&kind, &namespace, &name);
        let mut ignored = Vec::new();
        let object = match decode_object(&resolved, &value, self.origin, &mut ignored) {
            Ok(o) => o,
            Err((path, message)) => {
                self.error(Some(reference.clone()), &path, message);
                if resolved == Kind::AuthorizationPolicy {
                    self.stand_in(&lenient_policy(&value, self.origin), reference, &value);
                }
                return;
            }
        };
        let mut findings = Findings::default();
        // In a security policy an unknown field may be a misspelt condition (`form:` for
        // `from:`): ignoring it would enforce less than written, so it is refused.
        let security = matches!(resolved, Kind::AuthorizationPolicy | Kind::RequestAuthentication);
        for path in ignored {
            if security && path.starts_with("spec") {
                findings.error(path, "unknown field; a security policy is refused rather than enforced without it");
            } else {
                findings.warn(path, "unknown field, ignored");
            }
        }
        if name.is_empty() {
            findings.error("metadata.name", "name is required");
        } else if !is_dns1123_subdomain(&name) {
            findings.error("metadata.name", format!("{name:?} is not a valid DNS-1123 subdomain"));
        }
        crate::validation::validate_object(&object, &mut findings);
        let failed = findings.has_errors();
        self.diagnostics.extend(findings.into_diagnostics(self.origin, &reference));
        match object {
            _ if !failed => self.objects.push(Loaded::new(object, reference, self.origin.to_string(), &value)),
            Object::AuthorizationPolicy(policy) => self.stand_in(&policy, reference, &value),
            _ => {}
        }
    }

    /// Puts the fail-closed stand-in of a rejected AuthorizationPolicy in its place, and says so.
    fn stand_in(
        &mut self,
        policy: &IstioObject<model::authorization_policy::AuthorizationPolicySpec>,
        reference: ObjectRef,
        value: &Value,
    ) {
        let Some(mut stand_in) = model::authorization_policy::rejected_stand_in(policy) else { return };
        // Named as the document is, even when its metadata could not be read.
        stand_in.meta.name = reference.name.to_string();
        stand_in.meta.namespace = reference.namespace.to_string();
        let scope = match &stand_in.spec.selector {
            Some(s) if !s.match_labels.is_empty() => "the workloads it selects deny",
            _ if policy.meta.namespace == crate::snapshot::ROOT_NAMESPACE => "every workload of the mesh denies",
            _ => "every workload of its namespace denies",
        };
        self.diagnostics.push(Diagnostic {
            severity: Severity::Warning,
            origin: self.origin.to_string(),
            object: Some(reference.clone()),
            path: String::new(),
            code: None,
            message: format!(
                "the policy is rejected, so {scope} every request (fail closed) until it is fixed; \
                 its last good version, if sluice has one, applies instead"
            ),
        });
        let mut loaded =
            Loaded::new(Object::AuthorizationPolicy(Box::new(stand_in)), reference, self.origin.to_string(), value);
        loaded.stand_in = true;
        self.objects.push(loaded);
    }
}

/// As much of an AuthorizationPolicy that failed to decode as tells whom it was for: its
/// metadata, selector and action, each read on its own; what cannot be read is left out (so a
/// selector that cannot be read makes the policy namespace-wide).
fn lenient_policy(value: &Value, origin: &str) -> IstioObject<model::authorization_policy::AuthorizationPolicySpec> {
    let field = |path: &[&str]| path.iter().try_fold(value, |v, key| v.get(*key)).cloned().unwrap_or(Value::Null);
    let meta: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta =
        serde_json::from_value(field(&["metadata"])).unwrap_or_default();
    let spec = model::authorization_policy::AuthorizationPolicySpec {
        selector: serde_json::from_value(field(&["spec", "selector"])).unwrap_or(None),
        action: serde_json::from_value(field(&["spec", "action"])).unwrap_or(None),
        ..Default::default()
    };
    IstioObject { meta: Meta::from_object_meta(&meta, true), spec, origin: origin.to_string() }
}

/// RFC 1123 subdomain: what Kubernetes requires of most object names.
fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(model::common::is_dns1123_label)
}

type DecodeError = (String, String);

/// `http[1].tyop` rather than serde_ignored's `http.1.tyop`, matching the other diagnostics.
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => {
            let p = field_path(parent);
            if p.is_empty() { key.clone() } else { format!("{p}.{key}") }
        }
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

/// Deserializes `value` (rooted at field `prefix`) recording unknown fields in `ignored`; a
/// sequence where a struct is read is refused ([`no_positional`]).
fn decode<T: DeserializeOwned>(value: &Value, prefix: &str, ignored: &mut Vec<String>) -> Result<T, DecodeError> {
    let join = |p: String| match (prefix.is_empty(), p.as_str()) {
        (true, _) => p,
        (false, "" | ".") => prefix.to_string(),
        (false, _) => format!("{prefix}.{p}"),
    };
    let mut unknown = Vec::new();
    let mut record = |path: serde_ignored::Path<'_>| unknown.push(field_path(&path));
    match T::deserialize(serde_ignored::Deserializer::new(NoPositional(value), &mut record)) {
        Ok(typed) => {
            ignored.extend(unknown.into_iter().map(join));
            Ok(typed)
        }
        // Only a failure needs the path to where it failed: the value is decoded again,
        // tracking it, rather than tracking the path of every value of every document.
        Err(first) => match serde_path_to_error::deserialize::<_, T>(NoPositional(value)) {
            Err(e) => Err((join(e.path().to_string()), e.into_inner().to_string())),
            Ok(_) => Err((join(String::new()), first.to_string())),
        },
    }
}

fn decode_istio<S: DeserializeOwned>(
    value: &Value,
    origin: &str,
    ignored: &mut Vec<String>,
) -> Result<IstioObject<S>, DecodeError> {
    let meta = decode(value.get("metadata").unwrap_or(&Value::Null), "metadata", ignored)?;
    let spec = decode(value.get("spec").unwrap_or(&Value::Object(Default::default())), "spec", ignored)?;
    Ok(IstioObject { meta: Meta::from_object_meta(&meta, true), spec, origin: origin.to_string() })
}

fn decode_object(kind: &Kind, value: &Value, origin: &str, ignored: &mut Vec<String>) -> Result<Object, DecodeError> {
    Ok(match kind {
        Kind::Service => Object::Service(Box::new(decode(value, "", ignored)?)),
        Kind::EndpointSlice => Object::EndpointSlice(Box::new(decode(value, "", ignored)?)),
        Kind::Pod => Object::Pod(Box::new(decode(value, "", ignored)?)),
        Kind::Namespace => Object::Namespace(Box::new(decode(value, "", ignored)?)),
        Kind::VirtualService => Object::VirtualService(Box::new(decode_istio(value, origin, ignored)?)),
        Kind::DestinationRule => Object::DestinationRule(Box::new(decode_istio(value, origin, ignored)?)),
        Kind::ServiceEntry => Object::ServiceEntry(Box::new(decode_istio(value, origin, ignored)?)),
        Kind::WorkloadEntry => Object::WorkloadEntry(Box::new(decode_istio(value, origin, ignored)?)),
        Kind::Sidecar => Object::Sidecar(Box::new(decode_istio(value, origin, ignored)?)),
        Kind::AuthorizationPolicy => Object::AuthorizationPolicy(Box::new(decode_istio(value, origin, ignored)?)),
        Kind::PeerAuthentication => Object::PeerAuthentication(Box::new(decode_istio(value, origin, ignored)?)),
        Kind::RequestAuthentication => Object::RequestAuthentication(Box::new(decode_istio(value, origin, ignored)?)),
    })
}
