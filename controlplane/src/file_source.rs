//! The file source: reads YAML files and directories (recursively) into objects.

use std::path::{Path, PathBuf};

use sluice_translator::diagnostic::{Diagnostic, Severity};
use sluice_translator::model::Loaded;
use sluice_translator::parse::parse_documents;

/// True for the files the source reads.
fn is_config_file(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

/// Every config file under `paths` (files are taken as given, directories walked), sorted.
pub fn config_files(paths: &[PathBuf]) -> (Vec<PathBuf>, Vec<Diagnostic>) {
    let mut files = Vec::new();
    let mut diagnostics = Vec::new();
    for root in paths {
        if root.is_file() {
            files.push(root.clone());
            continue;
        }
        if !root.exists() {
            diagnostics.push(io_error(root, "no such file or directory".into()));
            continue;
        }
        for entry in walkdir::WalkDir::new(root).follow_links(true).sort_by_file_name() {
            match entry {
                Ok(e) if e.file_type().is_file() && is_config_file(e.path()) => files.push(e.into_path()),
                Ok(_) => {}
                Err(e) => diagnostics.push(io_error(root, e.to_string())),
            }
        }
    }
    files.sort();
    files.dedup();
    (files, diagnostics)
}

fn io_error(path: &Path, message: String) -> Diagnostic {
    Diagnostic {
        severity: Severity::Error,
        origin: path.display().to_string(),
        object: None,
        path: String::new(),
        code: None,
        message,
    }
}

/// Reads and parses every config file under `paths`.
pub fn load(paths: &[PathBuf]) -> (Vec<Loaded>, Vec<Diagnostic>) {
    let (files, mut diagnostics) = config_files(paths);
    let mut objects = Vec::new();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                let (o, d) = parse_documents(&file.display().to_string(), &text);
                objects.extend(o);
                diagnostics.extend(d);
            }
            Err(e) => diagnostics.push(io_error(&file, format!("cannot read: {e}"))),
        }
    }
    (objects, diagnostics)
}
