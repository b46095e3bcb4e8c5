//! Name words: first and last names that are popular somewhere in the world and rare as ordinary
//! words in English and Portuguese, so a capitalised one in a request is very likely a person.
//!
//! Built from names-dataset's first/last name tables (popularity rank per country, from a large
//! public-profile sample) and wordfreq's English and Portuguese frequency lists. Deriving takes
//! seconds (the tables are ~1.7 M pickled entries), so the result is cached as a text file, one word
//! per line, next to the tables.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};

/// A name counts when its rank in some country is at most this (names-dataset ranks the top
/// ~20,000 names per country).
pub const MAX_RANK: i64 = 5000;
/// ... and its lowercase form's Zipf frequency (log10 of occurrences per billion words) is below this
/// in both languages: "Street" (5.3) and "Will" (6.3) are dropped, "Christiansen" (2.5) kept.
pub const MAX_ZIPF: f32 = 4.0;
/// ... and below this when only one list ranks it: "Python" (3.8) and "Flask" (3.2) are each in one
/// country's surname list; "Christiansen" (2.5) passes anyway, "Kafka" (3.3, four lists) too.
pub const SINGLE_LIST_ZIPF: f32 = 3.0;

#[derive(Debug, thiserror::Error)]
pub enum NameWordsError {
    #[error("{path}: {why}")]
    Read { path: String, why: String },
}

fn read_err(path: &Path, why: impl std::fmt::Display) -> NameWordsError {
    NameWordsError::Read {
        path: path.display().to_string(),
        why: why.to_string(),
    }
}

/// The source files: names-dataset's `first_names.pkl.gz` and `last_names.pkl.gz`, and wordfreq's
/// `large_<lang>.msgpack.gz` lists.
pub struct Sources<'a> {
    pub first_names: &'a Path,
    pub last_names: &'a Path,
    pub word_lists: &'a [&'a Path],
}

/// Words of English or Portuguese: lowercase forms at this Zipf frequency or above in either list
/// ("geomancy" 1.7 is out, "nginx" 2.2 in). A capitalised word outside them ("Yefremova",
/// "Dzhambek") is most likely a name: on 3,000 ShareGPT prompts about a third of such words are
/// names and the rest rare terms, typos and foreign words, ~0.8 per KB.
pub const KNOWN_ZIPF: f32 = 2.0;

/// What the person detector takes from the sources.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Lexicon {
    /// Name words (see the module doc), as the tables write them ("Christiansen").
    pub name_words: HashSet<String>,
    /// Lowercase words known to English or Portuguese (Zipf >= [`KNOWN_ZIPF`]), with their Zipf
    /// frequency (the higher of the two languages).
    pub known: HashMap<String, f32>,
}

/// The cache files for `sources`, next to the last-name table, thresholds in their names: the name
/// words, and the known words.
pub fn cache_paths(sources: &Sources) -> [PathBuf; 2] {
    let dir = sources.last_names.parent().unwrap_or(Path::new("."));
    [
        // v3: "McDowell" beside "Mcdowell"; v4: SINGLE_LIST_ZIPF.
        dir.join(format!("name-words-v4-r{MAX_RANK}-z{MAX_ZIPF}.txt")),
        dir.join(format!("known-words-z{KNOWN_ZIPF}.tsv")),
    ]
}

/// Calls `each` with every non-empty line of `path`.
fn for_lines(
    path: &Path,
    mut each: impl FnMut(String) -> Result<(), NameWordsError>,
) -> Result<(), NameWordsError> {
    let f = std::fs::File::open(path).map_err(|e| read_err(path, e))?;
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(|e| read_err(path, e))?;
        if !line.is_empty() {
            each(line)?;
        }
    }
    Ok(())
}

fn read_words(path: &Path) -> Result<HashSet<String>, NameWordsError> {
    let mut set = HashSet::new();
    for_lines(path, |line| {
        set.insert(line);
        Ok(())
    })?;
    Ok(set)
}

/// `word<TAB>zipf` lines.
fn read_known(path: &Path) -> Result<HashMap<String, f32>, NameWordsError> {
    let mut map = HashMap::new();
    for_lines(path, |line| {
        let (w, z) = line
            .split_once('\t')
            .and_then(|(w, z)| Some((w, z.parse::<f32>().ok()?)))
            .ok_or_else(|| read_err(path, format!("not `word<TAB>zipf`: {line:?}")))?;
        map.insert(w.to_string(), z);
        Ok(())
    })?;
    Ok(map)
}

/// One line per item, sorted, written atomically (a temporary file renamed).
fn write_lines(path: &Path, mut lines: Vec<String>) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    lines.sort();
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for l in &lines {
            writeln!(f, "{l}")?;
        }
        f.into_inner()?.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The lexicon, from the cache when it exists, else derived and cached.
// Why the allow: a cache that cannot be written is no error (the lexicon is derived all the same);
// the note on stderr tells the operator why every start derives it again.
#[allow(clippy::print_stderr)]
pub fn load_or_derive(sources: &Sources) -> Result<Lexicon, NameWordsError> {
    let [names, known] = cache_paths(sources);
    if names.exists() && known.exists() {
        return Ok(Lexicon {
            name_words: read_words(&names)?,
            known: read_known(&known)?,
        });
    }
    let lex = derive(sources)?;
    // A cache that cannot be written (read-only folder) costs the next start the derivation again,
    // nothing else.
    let name_lines = lex.name_words.iter().cloned().collect();
    let known_lines = lex
        .known
        .iter()
        .map(|(w, z)| format!("{w}\t{z:.2}"))
        .collect();
    for (path, lines) in [(&names, name_lines), (&known, known_lines)] {
        if let Err(e) = write_lines(path, lines) {
            eprintln!("note: could not cache {}: {e}", path.display());
        }
    }
    Ok(lex)
}

#[derive(serde::Deserialize)]
struct NameEntry {
    rank: HashMap<String, i64>,
}

/// Reads a names-dataset table: a pickled dict name → {country, gender, rank}. The pickle is decoded
/// as data only (serde-pickle builds values and never imports or calls anything).
fn read_table(path: &Path) -> Result<HashMap<String, NameEntry>, NameWordsError> {
    let f = std::fs::File::open(path).map_err(|e| read_err(path, e))?;
    let gz = std::io::BufReader::new(flate2::read::GzDecoder::new(f));
    serde_pickle::from_reader(gz, serde_pickle::DeOptions::new()).map_err(|e| read_err(path, e))
}

/// Zipf frequency of each word of a wordfreq `cB` list: a header, then buckets of words, bucket i
/// holding words of frequency 10^(-i/100), i.e. Zipf 9 - i/100.
fn read_zipf(path: &Path, into: &mut HashMap<String, f32>) -> Result<(), NameWordsError> {
    let f = std::fs::File::open(path).map_err(|e| read_err(path, e))?;
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut raw)
        .map_err(|e| read_err(path, e))?;
    let lists: Vec<serde_json::Value> =
        rmp_serde::from_slice(&raw).map_err(|e| read_err(path, e))?;
    match lists.first().and_then(|h| h.get("format")) {
        Some(serde_json::Value::String(f)) if f == "cB" => {}
        _ => return Err(read_err(path, "not a wordfreq cB list")),
    }
    for (i, bucket) in lists[1..].iter().enumerate() {
        let zipf = 9.0 - i as f32 / 100.0;
        for w in bucket
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| w.as_str())
        {
            let z = into.entry(w.to_string()).or_insert(zipf);
            *z = z.max(zipf);
        }
    }
    Ok(())
}

/// Appends `w` to `out` with its first letter in upper case ("dowell" → "Dowell").
pub fn push_capitalised(out: &mut String, w: &str) {
    let mut c = w.chars();
    out.extend(c.next().into_iter().flat_map(char::to_uppercase));
    out.push_str(c.as_str());
}

/// Whether `w` has the shape of a name: a capital and then lowercase letters (apostrophes and
/// hyphens inside), three letters at least; or "Mc"/"Mac" before such a name ("McDowell").
pub fn name_shaped(w: &str) -> bool {
    if let Some(rest) = w.strip_prefix("Mc").or_else(|| w.strip_prefix("Mac")) {
        if rest.starts_with(char::is_uppercase) {
            return name_shaped(rest);
        }
    }
    let mut chars = w.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    let rest: Vec<char> = chars.collect();
    first.is_uppercase()
        && rest.len() >= 2
        && rest
            .iter()
            .all(|c| c.is_lowercase() || matches!(c, '\'' | '’' | '-'))
        && rest.last().is_some_and(|c| c.is_lowercase())
}

/// The name words of `sources` under `MAX_RANK`, `MAX_ZIPF` and `SINGLE_LIST_ZIPF`, and the words
/// at `KNOWN_ZIPF`.
pub fn derive(sources: &Sources) -> Result<Lexicon, NameWordsError> {
    let mut zipf = HashMap::new();
    for p in sources.word_lists {
        read_zipf(p, &mut zipf)?;
    }
    // How many ranked lists (a country's first or last names) have the name in their top MAX_RANK.
    let mut ranked: HashMap<String, usize> = HashMap::new();
    for table in [sources.first_names, sources.last_names] {
        for (name, e) in read_table(table)? {
            let n = e.rank.values().filter(|&&r| r <= MAX_RANK).count();
            if n > 0 && name_shaped(&name) {
                *ranked.entry(name).or_default() += n;
            }
        }
    }
    let mut out = HashSet::new();
    for (name, lists) in ranked {
        let z = zipf.get(&name.to_lowercase()).copied().unwrap_or(0.0);
        if z < MAX_ZIPF && (lists >= 2 || z < SINGLE_LIST_ZIPF) {
            // The tables write "Mcdowell"; text writes "McDowell".
            if let Some(rest) = name.strip_prefix("Mc").filter(|r| r.len() > 2) {
                let mut mc = String::from("Mc");
                push_capitalised(&mut mc, rest);
                out.insert(mc);
            }
            out.insert(name);
        }
    }
    let known = zipf.into_iter().filter(|&(_, z)| z >= KNOWN_ZIPF).collect();
    Ok(Lexicon {
        name_words: out,
        known,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Derivation over tiny tables in the real formats (gzipped pickle, gzipped wordfreq cB list):
    /// popular names stay, names only ranked past MAX_RANK go, names that are common words go, badly
    /// shaped names go; the cache is written and read back the same.
    #[test]
    fn derives_and_caches_name_words() {
        use std::collections::BTreeMap;
        let dir = tempfile::tempdir().unwrap();
        let gz = |path: &Path, bytes: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(
                std::fs::File::create(path).unwrap(),
                flate2::Compression::fast(),
            );
            e.write_all(bytes).unwrap();
            e.finish().unwrap();
        };
        let table = |names: &[(&str, i64)]| {
            let mut m = BTreeMap::new();
            for (n, r) in names {
                let mut e = BTreeMap::new();
                e.insert("rank", BTreeMap::from([("US", *r)]));
                e.insert("country", BTreeMap::from([("US", 1)]));
                m.insert(n.to_string(), e);
            }
            serde_pickle::to_vec(&m, serde_pickle::SerOptions::new()).unwrap()
        };
        let (first, last, en) = (
            dir.path().join("first.pkl.gz"),
            dir.path().join("last.pkl.gz"),
            dir.path().join("en.msgpack.gz"),
        );
        gz(
            &first,
            &table(&[("Kónya", 10), ("Rareone", 90_000), ("Will", 3)]),
        );
        gz(
            &last,
            &table(&[
                ("Christiansen", 400),
                ("Street", 700),
                ("MCDONALD", 5),
                ("Python", 900),
            ]),
        );
        // Bucket 0 is Zipf 9, bucket 300 Zipf 6; "christiansen" sits at Zipf 2.5 (bucket 650),
        // "geomancy" at 1.5, under KNOWN_ZIPF.
        let mut lists: Vec<serde_json::Value> =
            vec![serde_json::json!({"format": "cB", "version": 1})];
        lists.extend((0..=750).map(|i| match i {
            300 => serde_json::json!(["street", "will"]),
            550 => serde_json::json!(["python"]),
            650 => serde_json::json!(["christiansen"]),
            750 => serde_json::json!(["geomancy"]),
            _ => serde_json::json!([]),
        }));
        gz(&en, &rmp_serde::to_vec(&lists).unwrap());
        let words = [en.as_path()];
        let sources = Sources {
            first_names: &first,
            last_names: &last,
            word_lists: &words,
        };
        let want = Lexicon {
            name_words: ["Kónya", "Christiansen"].map(String::from).into(),
            known: [
                ("street", 6.0),
                ("will", 6.0),
                ("python", 3.5),
                ("christiansen", 2.5),
            ]
            .map(|(w, z)| (w.to_string(), z))
            .into(),
        };
        assert_eq!(load_or_derive(&sources).unwrap(), want);
        assert!(cache_paths(&sources).iter().all(|p| p.exists()));
        // The second load reads the cache (the sources could be gone).
        std::fs::remove_file(&last).unwrap();
        assert_eq!(load_or_derive(&sources).unwrap(), want);
    }

    #[test]
    fn name_shape() {
        for w in ["Kónya", "D'arcy", "Halldór", "Ngo", "McDowell", "MacLeod"] {
            assert!(name_shaped(w), "{w}");
        }
        for w in [
            "Li",
            "SMITH",
            "smith",
            "Mc Donald",
            "O'Neil",
            "Ann-",
            "A.",
            "McD",
            "MacX",
        ] {
            assert!(!name_shaped(w), "{w}");
        }
    }
}
