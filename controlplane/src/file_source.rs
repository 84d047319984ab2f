//! The file source: reads YAML files and directories (recursively) into objects.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sluice_translator::diagnostic::{Diagnostic, Severity};
use sluice_translator::model::Loaded;
use sluice_translator::parse::parse_documents;

use crate::store::GroupRead;

/// True for the files the source reads.
fn is_config_file(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

/// What a walk of the config paths found.
#[derive(Debug, Default)]
pub struct Walk {
    /// Every config file, sorted.
    pub files: Vec<PathBuf>,
    /// Why a root or a directory below it could not be read.
    pub diagnostics: Vec<Diagnostic>,
    /// The roots and directories that could not be read (missing, or no permission): what was
    /// read from under them before stays served.
    pub unreadable: Vec<PathBuf>,
}

impl Walk {
    /// True when `file` lies in a part of the tree this walk could not read.
    fn hides(&self, file: &Path) -> bool {
        self.unreadable.iter().any(|d| file.starts_with(d))
    }
}

/// True for entries the walk passes over: hidden ones, and so Kubernetes' ConfigMap volume
/// layout (`..data` and `..<timestamp>` hold the files the top-level links point to), which
/// would otherwise be read three times.
fn hidden(entry: &walkdir::DirEntry) -> bool {
    entry.depth() > 0 && entry.file_name().to_string_lossy().starts_with('.')
}

/// Every config file under `paths` (files are taken as given, directories walked).
pub fn config_files(paths: &[PathBuf]) -> Walk {
    let mut walk = Walk::default();
    for root in paths {
        if root.is_file() {
            walk.files.push(root.clone());
            continue;
        }
        if !root.exists() {
            walk.diagnostics.push(io_error(
                root,
                "no such file or directory: the objects read from it before stay served until it is back".into(),
            ));
            walk.unreadable.push(root.clone());
            continue;
        }
        let entries = walkdir::WalkDir::new(root).follow_links(true).sort_by_file_name().into_iter();
        for entry in entries.filter_entry(|e| !hidden(e)) {
            match entry {
                Ok(e) if e.file_type().is_file() && is_config_file(e.path()) => walk.files.push(e.into_path()),
                Ok(_) => {}
                Err(e) => {
                    let at = e.path().map_or_else(|| root.clone(), Path::to_path_buf);
                    walk.diagnostics.push(io_error(
                        &at,
                        format!("cannot read: {e}; the objects read from it before stay served until it is readable"),
                    ));
                    walk.unreadable.push(at);
                }
            }
        }
    }
    walk.files.sort();
    walk.files.dedup();
    walk
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
    let Walk { files, mut diagnostics, .. } = config_files(paths);
    let mut objects = Vec::new();
    for file in files {
        let (o, d) = read(&file);
        objects.extend(o);
        diagnostics.extend(d);
    }
    (objects, diagnostics)
}

fn read(file: &Path) -> (Vec<Loaded>, Vec<Diagnostic>) {
    match std::fs::read_to_string(file) {
        Ok(text) => parse_documents(&file.display().to_string(), &text),
        Err(e) => (Vec::new(), vec![io_error(file, format!("cannot read: {e}"))]),
    }
}

/// What a file looked like when it was parsed: size and modification and change times.
type Stamp = (u64, Option<std::time::SystemTime>, i64, i64);

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok(), m.ctime(), m.ctime_nsec()))
}

/// The files read so far: a reload parses only the files that changed since, and reports
/// only those to the store (a one-line edit in a mesh of 10,000 services must not parse them
/// all again, nor make the store compare them all).
#[derive(Default)]
pub struct FileCache {
    /// Stamps of the files as last read (None: changed while being read, read again next time).
    files: HashMap<PathBuf, Option<Stamp>>,
    /// Groups that carried only walk errors (a missing root, an unreadable directory), as last
    /// reported.
    errors: BTreeSet<String>,
    /// Every file has been reported once.
    reported: bool,
}

impl FileCache {
    /// Reads the config under `paths` again. Returns the groups (files) that are new, changed
    /// or gone since the last call — and on the first call every file, and true (a complete
    /// read).
    pub fn reload(&mut self, paths: &[PathBuf]) -> (Vec<GroupRead>, bool) {
        let walk = config_files(paths);
        let mut reads: Vec<GroupRead> = Vec::new();
        let mut seen = HashMap::new();
        for file in walk.files.iter().cloned() {
            let before = stamp(&file);
            if let Some(Some(known)) = self.files.remove(&file)
                && before.as_ref() == Some(&known)
            {
                seen.insert(file, Some(known));
                continue;
            }
            let (objects, diagnostics) = read(&file);
            // A file that changed while it was read is read again next time.
            let unchanged = before.filter(|s| stamp(&file).as_ref() == Some(s));
            reads.push((file.display().to_string(), Some((objects.into_iter().map(Arc::new).collect(), diagnostics))));
            seen.insert(file, unchanged);
        }
        for (gone, stamp) in std::mem::take(&mut self.files) {
            // Not seen because its directory (or the root) cannot be read now: not a deletion.
            if walk.hides(&gone) {
                seen.insert(gone, stamp);
            } else {
                reads.push((gone.display().to_string(), None));
            }
        }
        self.files = seen;
        let mut errors: BTreeMap<String, Vec<Diagnostic>> = BTreeMap::new();
        for d in walk.diagnostics {
            errors.entry(d.origin.clone()).or_default().push(d);
        }
        for gone in self.errors.iter().filter(|g| !errors.contains_key(*g)) {
            reads.push((gone.clone(), None));
        }
        self.errors = errors.keys().cloned().collect();
        reads.extend(errors.into_iter().map(|(group, d)| (group, Some((Vec::new(), d)))));
        (reads, !std::mem::replace(&mut self.reported, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DR: &str =
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: NAME}\nspec: {host: a}\n";

    /// Group names and how many objects each read has (None: gone).
    fn summary(reads: &[GroupRead], root: &Path) -> Vec<(String, Option<usize>)> {
        let name = |g: &str| g.strip_prefix(&*root.display().to_string()).unwrap_or(g).to_string();
        reads.iter().map(|(g, r)| (name(g), r.as_ref().map(|(o, _)| o.len()))).collect()
    }

    #[test]
    fn a_reload_reports_only_the_files_that_changed_or_went() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::write(root.join("a.yaml"), DR.replace("NAME", "a")).unwrap();
        std::fs::write(root.join("b.yaml"), format!("{}---\n{}", DR.replace("NAME", "b1"), DR.replace("NAME", "b2")))
            .unwrap();
        let mut cache = FileCache::default();
        let (reads, complete) = cache.reload(std::slice::from_ref(&root));
        assert!(complete, "the first read is complete");
        assert_eq!(summary(&reads, &root), [("/a.yaml".into(), Some(1)), ("/b.yaml".into(), Some(2))]);
        let (reads, complete) = cache.reload(std::slice::from_ref(&root));
        assert!(!complete && reads.is_empty(), "nothing changed: {reads:?}");
        std::fs::write(root.join("b.yaml"), DR.replace("NAME", "b1")).unwrap();
        std::fs::remove_file(root.join("a.yaml")).unwrap();
        let (reads, _) = cache.reload(std::slice::from_ref(&root));
        let mut got = summary(&reads, &root);
        got.sort();
        assert_eq!(got, [("/a.yaml".into(), None), ("/b.yaml".into(), Some(1))]);
        // A root that is missing is reported as its own group, and withdrawn when it is back.
        let missing = root.join("later");
        let (reads, _) = cache.reload(&[root.clone(), missing.clone()]);
        assert_eq!(summary(&reads, &root), [("/later".into(), Some(0))]);
        assert!(reads[0].1.as_ref().unwrap().1[0].message.contains("no such file"));
        std::fs::create_dir(&missing).unwrap();
        let (reads, _) = cache.reload(&[root.clone(), missing]);
        assert_eq!(summary(&reads, &root), [("/later".into(), None)]);
    }

    #[test]
    fn a_missing_root_or_unreadable_directory_keeps_what_was_read_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cfg");
        std::fs::create_dir_all(root.join("policies")).unwrap();
        std::fs::write(root.join("a.yaml"), DR.replace("NAME", "a")).unwrap();
        std::fs::write(root.join("policies/p.yaml"), DR.replace("NAME", "p")).unwrap();
        let mut cache = FileCache::default();
        let (reads, _) = cache.reload(std::slice::from_ref(&root));
        assert_eq!(reads.len(), 2);

        // The root goes (rm -rf, or the first half of a swap): nothing is reported gone, only why.
        std::fs::rename(&root, dir.path().join("old")).unwrap();
        let (reads, _) = cache.reload(std::slice::from_ref(&root));
        assert_eq!(summary(&reads, &root), [("".to_string(), Some(0))], "only the error group: {reads:?}");
        assert!(reads[0].1.as_ref().unwrap().1[0].message.contains("stay served"));
        // It comes back (a new directory, as an atomic swap by rename leaves it): read again,
        // the error withdrawn.
        std::fs::rename(dir.path().join("old"), &root).unwrap();
        std::fs::remove_file(root.join("a.yaml")).unwrap();
        let (reads, _) = cache.reload(std::slice::from_ref(&root));
        let mut got = summary(&reads, &root);
        got.sort();
        assert_eq!(got, [("".to_string(), None), ("/a.yaml".to_string(), None)], "a file gone meanwhile goes now");

        // A directory that cannot be read (here a dangling link in its place; a directory with
        // no read permission fails the same way): its files are kept, the walk says why.
        std::fs::rename(root.join("policies"), dir.path().join("policies")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("nowhere"), root.join("policies")).unwrap();
        let (reads, _) = cache.reload(std::slice::from_ref(&root));
        assert_eq!(summary(&reads, &root), [("/policies".to_string(), Some(0))], "{reads:?}");
        // Readable again: the error goes, the file was never gone.
        std::fs::remove_file(root.join("policies")).unwrap();
        std::fs::rename(dir.path().join("policies"), root.join("policies")).unwrap();
        let (reads, _) = cache.reload(std::slice::from_ref(&root));
        assert_eq!(summary(&reads, &root), [("/policies".to_string(), None)], "{reads:?}");
        // A directory deleted on purpose is a deletion of its files.
        std::fs::remove_dir_all(root.join("policies")).unwrap();
        let (reads, _) = cache.reload(std::slice::from_ref(&root));
        assert_eq!(summary(&reads, &root), [("/policies/p.yaml".to_string(), None)]);
    }

    #[test]
    fn a_configmap_volume_is_read_once() {
        // Kubernetes' layout: the files live in `..<timestamp>/`, `..data` links to it, and
        // each top-level name links to `..data/<name>`.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("..2024_01_01_00_00_00.1")).unwrap();
        std::fs::write(root.join("..2024_01_01_00_00_00.1/dr.yaml"), DR.replace("NAME", "a")).unwrap();
        std::os::unix::fs::symlink("..2024_01_01_00_00_00.1", root.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/dr.yaml", root.join("dr.yaml")).unwrap();
        let (objects, diagnostics) = load(&[root.to_path_buf()]);
        assert_eq!(objects.len(), 1, "{diagnostics:?}");
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
    }
}
