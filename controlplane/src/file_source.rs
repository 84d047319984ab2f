//! The file source: reads YAML files and directories (recursively) into objects.

use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    let (loaded, diagnostics) = load_cached(paths, &mut FileCache::default());
    // The cache is gone: every object has one owner and unwraps without a copy.
    let loaded = loaded.into_iter().map(|l| Arc::try_unwrap(l).unwrap_or_else(|l| (*l).clone())).collect();
    (loaded, diagnostics)
}

/// What a file looked like when it was parsed: size and modification and change times.
type Stamp = (u64, Option<std::time::SystemTime>, i64, i64);

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok(), m.ctime(), m.ctime_nsec()))
}

/// One parsed file: its stamp when read, its objects and its diagnostics.
type CachedFile = (Stamp, Vec<Arc<Loaded>>, Vec<Diagnostic>);

/// Parsed files by path: a reload parses only the files that changed since (a one-line edit in
/// a mesh of 10,000 services must not parse them all again).
#[derive(Default)]
pub struct FileCache {
    files: std::collections::HashMap<PathBuf, CachedFile>,
}

/// [`load`], reusing the parse of every file whose size and times are unchanged. Objects are
/// shared with the cache, not copied.
pub fn load_cached(paths: &[PathBuf], cache: &mut FileCache) -> (Vec<Arc<Loaded>>, Vec<Diagnostic>) {
    let (files, mut diagnostics) = config_files(paths);
    let mut objects = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for file in files {
        let before = stamp(&file);
        if let Some(entry) = cache.files.remove(&file).filter(|(s, ..)| before.as_ref() == Some(s)) {
            objects.extend(entry.1.iter().cloned());
            diagnostics.extend(entry.2.iter().cloned());
            seen.insert(file, entry);
            continue;
        }
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                let (o, d) = parse_documents(&file.display().to_string(), &text);
                let o: Vec<Arc<Loaded>> = o.into_iter().map(Arc::new).collect();
                objects.extend(o.iter().cloned());
                diagnostics.extend(d.iter().cloned());
                // Only a file that did not change while it was read is cached.
                if let Some(s) = before.filter(|s| stamp(&file).as_ref() == Some(s)) {
                    seen.insert(file, (s, o, d));
                }
            }
            Err(e) => diagnostics.push(io_error(&file, format!("cannot read: {e}"))),
        }
    }
    // Files that are gone leave the cache.
    cache.files = seen;
    (objects, diagnostics)
}
