//! Errors and warnings about config objects, each naming the file, the object, the field path and
//! the reason — the contract every user-facing message of sluice follows.

use std::fmt;

use smol_str::SmolStr;

/// Identifies one config object: `Kind/namespace/name`. The snapshot's persistent maps copy a
/// node of references on every change, so each part is a [`SmolStr`]: names up to 23 bytes are
/// held inline and a copy never allocates.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// The object's `kind` as written (e.g. `VirtualService`).
    pub kind: SmolStr,
    /// Namespace; empty for cluster-scoped kinds.
    pub namespace: SmolStr,
    /// `metadata.name`; empty when the document had none.
    pub name: SmolStr,
}

impl ObjectRef {
    /// Builds a reference from its three parts.
    pub fn new(kind: &str, namespace: &str, name: &str) -> Self {
        Self { kind: kind.into(), namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = if self.name.is_empty() { "<unnamed>" } else { &self.name };
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.kind, name)
        } else {
            write!(f, "{}/{}/{}", self.kind, self.namespace, name)
        }
    }
}

/// How bad a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// The object was rejected and is not part of the snapshot.
    Error,
    /// The object was accepted; something about it deserves attention.
    Warning,
}

/// One error or warning about one object (or one YAML document that is not yet an object).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// Where the object came from (a file path, or a label such as `kube`).
    pub origin: String,
    /// The object, when the document got far enough to tell.
    pub object: Option<ObjectRef>,
    /// Field path inside the object, e.g. `spec.http[0].route[1].weight`; empty for the whole object.
    pub path: String,
    /// Istio analyzer code where one applies (e.g. `IST0101`).
    pub code: Option<&'static str>,
    /// Why.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{level}")?;
        if let Some(code) = self.code {
            write!(f, "[{code}]")?;
        }
        if !self.origin.is_empty() {
            write!(f, ": {}", self.origin)?;
        }
        if let Some(object) = &self.object {
            write!(f, ": {object}")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Collects the problems found in one object while validating it; the object is rejected if any
/// error was recorded.
#[derive(Debug, Default)]
pub struct Findings {
    items: Vec<(Severity, String, Option<&'static str>, String)>,
}

impl Findings {
    /// Records an error at `path`.
    pub fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.items.push((Severity::Error, path.into(), None, message.into()));
    }

    /// Records a warning at `path`.
    pub fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.items.push((Severity::Warning, path.into(), None, message.into()));
    }

    /// Records a warning carrying an Istio analyzer code.
    pub fn warn_code(&mut self, code: &'static str, path: impl Into<String>, message: impl Into<String>) {
        self.items.push((Severity::Warning, path.into(), Some(code), message.into()));
    }

    /// True when at least one error was recorded.
    pub fn has_errors(&self) -> bool {
        self.items.iter().any(|i| i.0 == Severity::Error)
    }

    /// Turns the findings into diagnostics about `object` from `origin`.
    pub fn into_diagnostics(self, origin: &str, object: &ObjectRef) -> Vec<Diagnostic> {
        self.items
            .into_iter()
            .map(|(severity, path, code, message)| Diagnostic {
                severity,
                origin: origin.to_string(),
                object: Some(object.clone()),
                path,
                code,
                message,
            })
            .collect()
    }
}
