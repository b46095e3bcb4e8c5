//! Tokenizer built from GGUF metadata whose token ids match llama.cpp's.
//!
//! Two vocabulary families are supported, as llama.cpp names them in `tokenizer.ggml.model`:
//!
//! * `gpt2`: byte-level BPE. The text is pre-split by the regular expressions that `tokenizer.ggml.pre`
//!   selects (each expression splits the pieces the previous one produced; text between matches is kept
//!   as its own piece), every piece is mapped byte by byte to the GPT-2 "printable" code points, and the
//!   merges of `tokenizer.ggml.merges` are applied lowest rank first.
//! * `llama`: SentencePiece-style BPE driven by token scores: spaces become U+2581, adjacent symbols whose
//!   concatenation is a vocabulary entry are merged highest score first, and characters that form no
//!   token fall back to `<0xXX>` byte tokens.
//!
//! Before either runs, the text is partitioned on special tokens (control and user-defined tokens; control
//! ones only when `parse_special` is set), longest token text first.
//!
//! The common pre-tokenizer expressions (GPT-2, Llama-3, Qwen2 and the digit splitter) are implemented
//! as hand-written scanners with the exact semantics of the expressions; the rarer ones go through
//! `fancy_regex` over a "collapsed" copy of the text in which every non-ASCII code point stands for its
//! Unicode category, which is how llama.cpp evaluates them too.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};

use crate::gguf::{GgufFile, Value};

// Per-token attributes (a bit set).
const ATTR_UNKNOWN: u16 = 1 << 0;
const ATTR_UNUSED: u16 = 1 << 1;
const ATTR_NORMAL: u16 = 1 << 2;
const ATTR_CONTROL: u16 = 1 << 3;
const ATTR_USER_DEFINED: u16 = 1 << 4;
const ATTR_BYTE: u16 = 1 << 5;
const ATTR_LSTRIP: u16 = 1 << 7;
const ATTR_RSTRIP: u16 = 1 << 8;

/// Attributes that make a token invisible when special tokens are not rendered.
const ATTR_HIDDEN: u16 = ATTR_UNKNOWN | ATTR_CONTROL;

const SPM_SPACE: &str = "\u{2581}";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF has no tokenizer: metadata key `{0}` is missing (was the file converted with its vocabulary?)")]
    MissingKey(&'static str),
    #[error("GGUF metadata key `{key}` is malformed: {what}")]
    BadMetadata { key: &'static str, what: String },
    #[error("unsupported tokenizer model \"{0}\" (supported: gpt2, llama)")]
    UnsupportedModel(String),
    #[error("unsupported BPE pre-tokenizer \"{0}\" (tokenizer.ggml.pre); supported: {1}")]
    UnsupportedPre(String, String),
    #[error("pre-tokenizer expression {expr:?} does not compile: {msg}")]
    Regex { expr: String, msg: String },
}

#[derive(Clone, Debug)]
struct TokenData {
    text: String,
    score: f32,
    attr: u16,
}

// ---------------------------------------------------------------------------------------------------
// Unicode categories of code points
// ---------------------------------------------------------------------------------------------------

/// Flags of one code point; `IN` is set for every real code point so that a zero value means "past the
/// end of the piece" in the scanners.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct CFlags(u8);

impl CFlags {
    const IN: u8 = 1 << 0;
    const LETTER: u8 = 1 << 1;
    const NUMBER: u8 = 1 << 2;
    const WS: u8 = 1 << 3;
    const PUNCT: u8 = 1 << 4;
    const MARK: u8 = 1 << 5;
    const SYMBOL: u8 = 1 << 6;

    fn letter(self) -> bool {
        self.0 & Self::LETTER != 0
    }
    fn number(self) -> bool {
        self.0 & Self::NUMBER != 0
    }
    fn ws(self) -> bool {
        self.0 & Self::WS != 0
    }
    fn inside(self) -> bool {
        self.0 != 0
    }
}

/// Code points first assigned in Unicode 16.0. The regex engine's tables know them, llama.cpp's Unicode
/// 15 tables do not (they are "unassigned" there, so neither letter, number nor punctuation); they are
/// classified as unassigned so that token ids stay identical. Found by comparing the category of every
/// code point between the two.
const UNICODE16_ADDITIONS: &[(u32, u32)] = &[
    (0x0897, 0x0897),
    (0x1B4E, 0x1B4F),
    (0x1B7F, 0x1B7F),
    (0x1C89, 0x1C8A),
    (0x2427, 0x2429),
    (0x31E4, 0x31E5),
    (0xA7CB, 0xA7CD),
    (0xA7DA, 0xA7DC),
    (0x105C0, 0x105F3),
    (0x10D40, 0x10D65),
    (0x10D69, 0x10D85),
    (0x10D8E, 0x10D8F),
    (0x10EC2, 0x10EC4),
    (0x10EFC, 0x10EFC),
    (0x11380, 0x11389),
    (0x1138B, 0x1138B),
    (0x1138E, 0x1138E),
    (0x11390, 0x113B5),
    (0x113B7, 0x113C0),
    (0x113C2, 0x113C2),
    (0x113C5, 0x113C5),
    (0x113C7, 0x113CA),
    (0x113CC, 0x113D5),
    (0x113D7, 0x113D8),
    (0x113E1, 0x113E2),
    (0x116D0, 0x116E3),
    (0x11BC0, 0x11BE1),
    (0x11BF0, 0x11BF9),
    (0x11DE0, 0x11DE9),
    (0x11F5A, 0x11F5A),
    (0x13460, 0x143FA),
    (0x16100, 0x16139),
    (0x16D40, 0x16D79),
    (0x16FF4, 0x16FF6),
    (0x18CFF, 0x18CFF),
    (0x1CC00, 0x1CCF9),
    (0x1CD00, 0x1CEB3),
    (0x1E5D0, 0x1E5FA),
    (0x1E5FF, 0x1E5FF),
    (0x1F8B2, 0x1F8BB),
    (0x1F8C0, 0x1F8C1),
    (0x1FA89, 0x1FA89),
    (0x1FA8F, 0x1FA8F),
    (0x1FABE, 0x1FABE),
    (0x1FAC6, 0x1FAC6),
    (0x1FADC, 0x1FADC),
    (0x1FADF, 0x1FADF),
    (0x1FAE9, 0x1FAE9),
    (0x1FBCB, 0x1FBEF),
];

fn unicode16_addition(c: char) -> bool {
    let c = c as u32;
    let i = UNICODE16_ADDITIONS.partition_point(|&(_, hi)| hi < c);
    UNICODE16_ADDITIONS.get(i).is_some_and(|&(lo, _)| lo <= c)
}

/// Classifies code points by Unicode general category. ASCII comes from a table; other code points are
/// looked up with the regex engine's Unicode tables and memoised per call.
struct Classifier {
    letter: fancy_regex::Regex,
    punct: fancy_regex::Regex,
    mark: fancy_regex::Regex,
    symbol: fancy_regex::Regex,
    ascii: [CFlags; 128],
}

impl Classifier {
    // Four fixed patterns that fancy-regex accepts (every tokenizer test compiles them): cannot fail.
    #[allow(clippy::expect_used)]
    fn new() -> Self {
        let re = |p: &str| fancy_regex::Regex::new(p).expect("static category regex");
        let mut ascii = [CFlags::default(); 128];
        for (c, f) in ascii.iter_mut().enumerate() {
            let ch = c as u8 as char;
            let mut v = CFlags::IN;
            if ch.is_ascii_alphabetic() {
                v |= CFlags::LETTER;
            } else if ch.is_ascii_digit() {
                v |= CFlags::NUMBER;
            } else if matches!(ch, '\t' | '\n' | '\x0B' | '\x0C' | '\r' | ' ') {
                v |= CFlags::WS;
            } else if "$+<=>^`|~".contains(ch) {
                v |= CFlags::SYMBOL;
            } else if ch.is_ascii_punctuation() {
                v |= CFlags::PUNCT;
            }
            *f = CFlags(v);
        }
        Self {
            letter: re(r"\p{L}"),
            punct: re(r"\p{P}"),
            mark: re(r"\p{M}"),
            symbol: re(r"\p{S}"),
            ascii,
        }
    }

    fn classify(&self, c: char, cache: &mut HashMap<char, CFlags>) -> CFlags {
        if (c as u32) < 128 {
            return self.ascii[c as usize];
        }
        if let Some(&f) = cache.get(&c) {
            return f;
        }
        if unicode16_addition(c) {
            cache.insert(c, CFlags(CFlags::IN));
            return CFlags(CFlags::IN);
        }
        let mut buf = [0u8; 4];
        let s = &*c.encode_utf8(&mut buf);
        let is = |re: &fancy_regex::Regex| re.is_match(s).unwrap_or(false);
        let mut v = CFlags::IN;
        if c.is_whitespace() {
            v |= CFlags::WS;
        }
        if c.is_numeric() {
            v |= CFlags::NUMBER;
        } else if is(&self.letter) {
            v |= CFlags::LETTER;
        } else if is(&self.punct) {
            v |= CFlags::PUNCT;
        } else if is(&self.mark) {
            v |= CFlags::MARK;
        } else if is(&self.symbol) {
            v |= CFlags::SYMBOL;
        }
        let f = CFlags(v);
        cache.insert(c, f);
        f
    }
}

// ---------------------------------------------------------------------------------------------------
// Pre-tokenizer
// ---------------------------------------------------------------------------------------------------

const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_LLAMA3_CI: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_DIGIT: &str = r"\p{N}";
const RE_GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_BLOOM: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

/// How a `tokenizer.ggml.pre` value configures the BPE tokenizer.
struct PreConfig {
    exprs: &'static [&'static str],
    ignore_merges: bool,
    /// Default for add_bos before `tokenizer.ggml.add_bos_token` is read.
    add_bos: bool,
    /// The model has no BOS token by default.
    no_bos: bool,
}

const SUPPORTED_PRE: &str = "default, llama3 (llama-bpe, llama-v3, falcon3, pixtral, lfm2, ...), dbrx, smaug-bpe, \
    chatglm-bpe, glm4, gpt-2 (phi-2, mpt, olmo, jais, roberta-bpe, ...), smollm (starcoder, refact, command-r, \
    codeshell, exaone, minerva-7b, mellum2), qwen2 (deepseek-r1-qwen, stablelm2, megrez, hunyuan, solar-open), \
    qwen35, falcon, deepseek-v3, bloom, poro-chat, gpt3-finnish, viking, tekken, gpt-4o (llama4), chameleon";

fn pre_config(pre: &str) -> Option<PreConfig> {
    const DEFAULT: &[&str] = &[
        r"[\p{P}\$\+<=>\^~\|]+",
        RE_GPT2,
        r"\p{N}+",
        "[0-9][0-9][0-9]",
    ];
    let c = |exprs: &'static [&'static str]| PreConfig {
        exprs,
        ignore_merges: false,
        add_bos: false,
        no_bos: false,
    };
    Some(match pre {
        "" | "default" => c(DEFAULT),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => PreConfig {
            ignore_merges: true,
            add_bos: true,
            ..c(&[RE_LLAMA3])
        },
        "dbrx" | "smaug-bpe" => c(&[RE_LLAMA3]),
        "chatglm-bpe" => PreConfig {
            no_bos: true,
            ..c(&[RE_LLAMA3])
        },
        "glm4" | "glm5" => PreConfig {
            no_bos: true,
            ignore_merges: true,
            ..c(&[RE_LLAMA3])
        },
        "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
        | "jina-v2-de" | "a.x-4.0" | "mellum" | "modern-bert" | "jina-v1-en" | "jina-v2-code"
        | "roberta-bpe" | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" | "exaone4" => {
            c(&[RE_GPT2])
        }
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => c(&[RE_DIGIT, RE_GPT2]),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan"
        | "solar-open" => c(&[RE_QWEN2]),
        "qwen35" => c(&[RE_QWEN35]),
        "falcon" => c(&[
            r"[\p{P}\$\+<=>\^~\|`]+",
            r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
            "[0-9][0-9][0-9]",
        ]),
        "deepseek-v3" | "hunyuan-dense" | "joyai-llm" | "hy_v4" => c(&[
            r"\p{N}{1,3}",
            "[一-龥぀-ゟ゠-ヿ]+",
            r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
        ]),
        "poro-chat" | "bloom" | "gpt3-finnish" => c(&[RE_BLOOM]),
        "viking" => c(&[RE_BLOOM, RE_DIGIT]),
        "tekken" => PreConfig {
            ignore_merges: true,
            add_bos: true,
            ..c(&[RE_TEKKEN])
        },
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => c(&[RE_GPT4O]),
        "chameleon" => PreConfig {
            add_bos: true,
            ..c(&[
                "<sentinel:[0-9]+>",
                "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
                "([\\t\\n]|    |  )",
                r"\p{N}",
                r"[\p{P}!-/:-@\[-`{-~]",
                RE_GPT2,
            ])
        },
        _ => return None,
    })
}

/// One pre-tokenizer step: splits each piece into finer pieces.
enum Splitter {
    /// `'s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)` (the GPT-2 expression).
    Gpt2,
    /// The Llama-3 (max_digits = 3) and Qwen2 (max_digits = 1) expressions.
    Llama3 { max_digits: usize },
    /// `\p{N}`: every number code point is a piece of its own.
    Digits,
    /// Any other expression, matched over the collapsed text when it names Unicode categories.
    Regex {
        re: fancy_regex::Regex,
        collapsed: bool,
    },
}

/// Marker code points standing for categories in collapsed text (private use area).
const COLLAPSED_OTHER: char = '\u{E0D0}';
const COLLAPSED_NUMBER: char = '\u{E0D1}';
const COLLAPSED_LETTER: char = '\u{E0D2}';
const COLLAPSED_PUNCT: char = '\u{E0D3}';
const COLLAPSED_MARK: char = '\u{E0D4}';
const COLLAPSED_SYMBOL: char = '\u{E0D5}';

/// Rewrites `\p{N}`, `\p{L}`, ... into classes over the collapsed text: the category marker plus the
/// ASCII members of the category. Returns None when the expression names no category.
fn collapse_regex(expr: &str) -> Option<String> {
    const CATS: &[(&str, char, &str)] = &[
        (r"\p{N}", COLLAPSED_NUMBER, r"\x30-\x39"),
        (r"\p{L}", COLLAPSED_LETTER, r"\x41-\x5A\x61-\x7A"),
        (
            r"\p{P}",
            COLLAPSED_PUNCT,
            r"\x21-\x23\x25-\x2A\x2C-\x2F\x3A-\x3B\x3F-\x40\x5B-\x5D\x5F\x7B\x7D",
        ),
        (r"\p{M}", COLLAPSED_MARK, ""),
        (
            r"\p{S}",
            COLLAPSED_SYMBOL,
            r"\x24\x2B\x3C-\x3E\x5E\x60\x7C\x7E",
        ),
        (r"\p{Lu}", COLLAPSED_LETTER, r"\x41-\x5A\x61-\x7A"),
        (r"\p{Ll}", COLLAPSED_LETTER, r"\x41-\x5A\x61-\x7A"),
        (r"\p{Lt}", COLLAPSED_LETTER, r"\x41-\x5A\x61-\x7A"),
        (r"\p{Lm}", COLLAPSED_LETTER, r"\x41-\x5A\x61-\x7A"),
        (r"\p{Lo}", COLLAPSED_LETTER, r"\x41-\x5A\x61-\x7A"),
    ];
    if !CATS.iter().any(|(p, _, _)| expr.contains(p)) {
        return None;
    }
    let b = expr.as_bytes();
    let mut out = String::with_capacity(expr.len() * 2);
    let mut inside = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'[' && (i == 0 || b[i - 1] != b'\\') {
            out.push('[');
            inside = true;
            i += 1;
            continue;
        }
        if inside && c == b']' && b[i - 1] != b'\\' {
            out.push(']');
            inside = false;
            i += 1;
            continue;
        }
        if c == b'\\' && expr[i..].starts_with(r"\p{") {
            if let Some(&(pat, marker, ascii)) =
                CATS.iter().find(|(p, _, _)| expr[i..].starts_with(p))
            {
                if !inside {
                    out.push('[');
                }
                out.push_str(&format!("\\x{{{:X}}}", marker as u32));
                out.push_str(ascii);
                if !inside {
                    out.push(']');
                }
                i += pat.len();
                continue;
            }
        }
        // copy one whole UTF-8 character (i < len and on a character boundary: never None)
        let ch = expr[i..].chars().next()?;
        out.push(ch);
        i += ch.len_utf8();
    }
    Some(out)
}

impl Splitter {
    fn new(expr: &str) -> Result<Self, TokenizerError> {
        Ok(match expr {
            RE_GPT2 => Splitter::Gpt2,
            RE_LLAMA3 | RE_LLAMA3_CI => Splitter::Llama3 { max_digits: 3 },
            RE_QWEN2 => Splitter::Llama3 { max_digits: 1 },
            RE_DIGIT => Splitter::Digits,
            _ => {
                let (src, collapsed) = match collapse_regex(expr) {
                    Some(s) => (s, true),
                    None => (expr.to_string(), false),
                };
                let re = fancy_regex::Regex::new(&src).map_err(|e| TokenizerError::Regex {
                    expr: expr.to_string(),
                    msg: e.to_string(),
                })?;
                Splitter::Regex { re, collapsed }
            }
        })
    }

    /// Splits each range of `pieces` (code point indices into `cs`) and returns the new ranges.
    fn split(&self, cs: &[char], fl: &[CFlags], pieces: &[(usize, usize)]) -> Vec<(usize, usize)> {
        let mut out = Vec::with_capacity(pieces.len() * 2);
        for &(ini, end) in pieces {
            match self {
                Splitter::Gpt2 => split_gpt2(cs, fl, ini, end, &mut out),
                Splitter::Llama3 { max_digits } => {
                    split_llama3(cs, fl, ini, end, *max_digits, &mut out)
                }
                Splitter::Digits => {
                    let mut start = ini;
                    for (p, f) in fl.iter().enumerate().take(end).skip(ini) {
                        if f.number() {
                            if p > start {
                                out.push((start, p));
                            }
                            out.push((p, p + 1));
                            start = p + 1;
                        }
                    }
                    if end > start {
                        out.push((start, end));
                    }
                }
                Splitter::Regex { re, collapsed } => {
                    split_regex(re, *collapsed, cs, fl, ini, end, &mut out)
                }
            }
        }
        out
    }
}

/// Emits pieces into `out`; `prev` is where the next piece starts.
struct Emit<'a> {
    out: &'a mut Vec<(usize, usize)>,
    prev: usize,
}

impl Emit<'_> {
    fn to(&mut self, end: usize) {
        if end > self.prev {
            self.out.push((self.prev, end));
        }
        self.prev = end;
    }
}

/// GPT-2 expression: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)` (and, as
/// in llama.cpp, a trailing `|\s+` so that whitespace is never left unmatched).
fn split_gpt2(cs: &[char], fl: &[CFlags], ini: usize, end: usize, out: &mut Vec<(usize, usize)>) {
    let flags = |p: usize| if p < end { fl[p] } else { CFlags::default() };
    let mut e = Emit { out, prev: ini };
    let mut pos = ini;
    while pos < end {
        let c = cs[pos];
        if c == '\'' && pos + 1 < end {
            let n = cs[pos + 1];
            if matches!(n, 's' | 't' | 'm' | 'd') {
                pos += 2;
                e.to(pos);
                continue;
            }
            if pos + 2 < end {
                let nn = cs[pos + 2];
                if matches!((n, nn), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                    pos += 3;
                    e.to(pos);
                    continue;
                }
            }
        }
        let sp = usize::from(c == ' ');
        let f2 = if c == ' ' { flags(pos + 1) } else { fl[pos] };
        if f2.letter() {
            pos += sp;
            while flags(pos).letter() {
                pos += 1;
            }
            e.to(pos);
            continue;
        }
        if f2.number() {
            pos += sp;
            while flags(pos).number() {
                pos += 1;
            }
            e.to(pos);
            continue;
        }
        let other = |f: CFlags| f.inside() && !(f.ws() || f.letter() || f.number());
        if other(f2) {
            pos += sp;
            while other(flags(pos)) {
                pos += 1;
            }
            e.to(pos);
            continue;
        }
        let mut n_ws = 0;
        while flags(pos + n_ws).ws() {
            n_ws += 1;
        }
        if n_ws > 1 && pos + n_ws < end {
            // \s+(?!\S): leave the last whitespace for the word that follows
            pos += n_ws - 1;
            e.to(pos);
            continue;
        }
        if n_ws > 0 {
            pos += n_ws;
            e.to(pos);
            continue;
        }
        pos += 1;
        e.to(pos);
    }
}

/// Llama-3 / Qwen2 expression: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max}|
/// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`.
fn split_llama3(
    cs: &[char],
    fl: &[CFlags],
    ini: usize,
    end: usize,
    max_digits: usize,
    out: &mut Vec<(usize, usize)>,
) {
    let flags = |p: usize| if p < end { fl[p] } else { CFlags::default() };
    let cpt = |p: usize| if p < end { Some(cs[p]) } else { None };
    let mut e = Emit { out, prev: ini };
    let mut pos = ini;
    while pos < end {
        let c = cs[pos];
        let f = fl[pos];
        if c == '\'' && pos + 1 < end {
            let n = cs[pos + 1].to_ascii_lowercase();
            if matches!(n, 's' | 't' | 'm' | 'd') {
                pos += 2;
                e.to(pos);
                continue;
            }
            if pos + 2 < end {
                let nn = cs[pos + 2].to_ascii_lowercase();
                if matches!((n, nn), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                    pos += 3;
                    e.to(pos);
                    continue;
                }
            }
        }
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if !(c == '\r' || c == '\n' || f.number()) && (f.letter() || flags(pos + 1).letter()) {
            pos += 1;
            while flags(pos).letter() {
                pos += 1;
            }
            e.to(pos);
            continue;
        }
        // \p{N}{1,max}
        if f.number() {
            let mut run = 0;
            while flags(pos).number() {
                pos += 1;
                run += 1;
                if run >= max_digits {
                    e.to(pos);
                    run = 0;
                }
            }
            e.to(pos);
            continue;
        }
        // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
        let other = |f: CFlags| f.inside() && !(f.ws() || f.letter() || f.number());
        let f2 = if c == ' ' { flags(pos + 1) } else { f };
        if !(f2.ws() || f2.letter() || f2.number()) {
            pos += usize::from(c == ' ');
            while other(flags(pos)) {
                pos += 1;
            }
            while matches!(cpt(pos), Some('\r' | '\n')) {
                pos += 1;
            }
            e.to(pos);
            continue;
        }
        let mut n_ws = 0;
        let mut last_nl = None;
        while flags(pos + n_ws).ws() {
            if matches!(cs[pos + n_ws], '\r' | '\n') {
                last_nl = Some(pos + n_ws + 1);
            }
            n_ws += 1;
        }
        // \s*[\r\n]+
        if let Some(p) = last_nl {
            pos = p;
            e.to(pos);
            continue;
        }
        // \s+(?!\S)
        if n_ws > 1 && pos + n_ws < end {
            pos += n_ws - 1;
            e.to(pos);
            continue;
        }
        if n_ws > 0 {
            pos += n_ws;
            e.to(pos);
            continue;
        }
        pos += 1;
        e.to(pos);
    }
}

/// Generic expression: matches and the text between them both become pieces.
fn split_regex(
    re: &fancy_regex::Regex,
    collapsed: bool,
    cs: &[char],
    fl: &[CFlags],
    ini: usize,
    end: usize,
    out: &mut Vec<(usize, usize)>,
) {
    // The text the expression sees, and the byte offset of each code point in it.
    let mut s = String::with_capacity(end - ini);
    let mut offs = Vec::with_capacity(end - ini + 1);
    for p in ini..end {
        offs.push(s.len());
        let c = cs[p];
        let f = fl[p];
        let m = if (c as u32) < 128 {
            c
        } else if f.ws() {
            '\x0B'
        } else if !collapsed {
            c
        } else if f.number() {
            COLLAPSED_NUMBER
        } else if f.letter() {
            COLLAPSED_LETTER
        } else if f.0 & CFlags::PUNCT != 0 {
            COLLAPSED_PUNCT
        } else if f.0 & CFlags::MARK != 0 {
            COLLAPSED_MARK
        } else if f.0 & CFlags::SYMBOL != 0 {
            COLLAPSED_SYMBOL
        } else {
            COLLAPSED_OTHER
        };
        s.push(m);
    }
    offs.push(s.len());
    let to_cp = |b: usize| ini + offs.partition_point(|&o| o < b);
    let mut e = Emit { out, prev: ini };
    for m in re.find_iter(&s) {
        let Ok(m) = m else { break };
        let (a, b) = (to_cp(m.start()), to_cp(m.end()));
        e.to(a);
        e.to(b);
    }
    e.to(end);
}

// ---------------------------------------------------------------------------------------------------
// GPT-2 byte <-> code point mapping
// ---------------------------------------------------------------------------------------------------

fn byte_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut n = 0;
    for b in 0..256u32 {
        map[b as usize] = if printable(b) {
            char::from(b as u8)
        } else {
            n += 1;
            // At most 255 + 68 = 0x143 (68 bytes are not printable): always a valid char.
            char::from_u32(255 + n).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
    }
    map
}

// ---------------------------------------------------------------------------------------------------
// The tokenizer
// ---------------------------------------------------------------------------------------------------

struct Bpe {
    splitters: Vec<Splitter>,
    /// (left symbol, right symbol) -> (rank, merged symbol). Symbols are vocabulary ids, or ids from
    /// `n_vocab` up for strings that occur in merges without being tokens.
    merges: HashMap<(u32, u32), (u32, u32)>,
    extra_syms: HashMap<String, u32>,
    ignore_merges: bool,
    byte_map: [char; 256],
    unicode_to_byte: HashMap<char, u8>,
}

enum Model {
    Bpe(Box<Bpe>),
    Spm,
}

/// A trie over the texts of special tokens, for finding all their occurrences in one pass.
struct Trie {
    nodes: Vec<TrieNode>,
    first: [bool; 256],
}

impl Default for Trie {
    fn default() -> Self {
        Self {
            nodes: Vec::new(),
            first: [false; 256],
        }
    }
}

#[derive(Default)]
struct TrieNode {
    children: Vec<(u8, u32)>,
    token: Option<u32>,
}

impl Trie {
    fn insert(&mut self, text: &[u8], id: u32) {
        if self.nodes.is_empty() {
            self.nodes.push(TrieNode::default());
        }
        if let Some(&b) = text.first() {
            self.first[b as usize] = true;
        }
        let mut n = 0usize;
        for &b in text {
            n = match self.nodes[n].children.binary_search_by_key(&b, |c| c.0) {
                Ok(i) => self.nodes[n].children[i].1 as usize,
                Err(i) => {
                    let new = self.nodes.len() as u32;
                    self.nodes.push(TrieNode::default());
                    self.nodes[n].children.insert(i, (b, new));
                    new as usize
                }
            };
        }
        self.nodes[n].token = Some(id);
    }

    /// Calls `f(token)` for every token whose text starts at `text[0]`.
    fn matches_at(&self, text: &[u8], mut f: impl FnMut(u32)) {
        if self.nodes.is_empty() || text.is_empty() || !self.first[text[0] as usize] {
            return;
        }
        let mut n = 0usize;
        for &b in text {
            match self.nodes[n].children.binary_search_by_key(&b, |c| c.0) {
                Ok(i) => n = self.nodes[n].children[i].1 as usize,
                Err(_) => return,
            }
            if let Some(t) = self.nodes[n].token {
                f(t);
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Frag {
    Text(usize, usize),
    Token(u32),
}

/// Tokenizer with llama.cpp-identical encoding. Cheap to share across threads (`&Tokenizer` is `Sync`).
pub struct Tokenizer {
    model: Model,
    tokens: Vec<TokenData>,
    token_to_id: HashMap<String, u32>,
    /// token_to_piece with special tokens rendered.
    pieces: Vec<Vec<u8>>,
    /// Special tokens considered by the partition, longest text first.
    special_rank: HashMap<u32, usize>,
    special_trie: Trie,
    classifier: Classifier,
    eog: HashSet<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    model_name: String,
    pre_name: String,
}

fn meta_str<'a>(
    m: &'a BTreeMap<String, Value>,
    key: &'static str,
) -> Result<Option<&'a str>, TokenizerError> {
    match m.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(TokenizerError::BadMetadata {
            key,
            what: "expected a string".into(),
        }),
    }
}

fn meta_bool(m: &BTreeMap<String, Value>, key: &str) -> Option<bool> {
    match m.get(key) {
        Some(Value::Bool(b)) => Some(*b),
        Some(v) => v.as_u64().map(|x| x != 0),
        None => None,
    }
}

fn meta_array<'a>(
    m: &'a BTreeMap<String, Value>,
    key: &'static str,
) -> Result<Option<&'a [Value]>, TokenizerError> {
    match m.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(_) => Err(TokenizerError::BadMetadata {
            key,
            what: "expected an array".into(),
        }),
    }
}

fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0B' | b'\x0C' | b'\r')
}

impl Tokenizer {
    pub fn from_gguf(g: &GgufFile) -> Result<Self, TokenizerError> {
        Self::from_metadata(&g.metadata)
    }

    /// Builds the tokenizer from GGUF metadata (`tokenizer.ggml.*`, `general.name`).
    pub fn from_metadata(m: &BTreeMap<String, Value>) -> Result<Self, TokenizerError> {
        let model_kind = meta_str(m, "tokenizer.ggml.model")?
            .ok_or(TokenizerError::MissingKey("tokenizer.ggml.model"))?;
        let pre = meta_str(m, "tokenizer.ggml.pre")?.unwrap_or("").to_string();

        let list = meta_array(m, "tokenizer.ggml.tokens")?
            .ok_or(TokenizerError::MissingKey("tokenizer.ggml.tokens"))?;
        let n_vocab = list.len();
        let scores = meta_array(m, "tokenizer.ggml.scores")?;
        let types = meta_array(m, "tokenizer.ggml.token_type")?;
        if scores.is_some_and(|s| s.len() < n_vocab) {
            return Err(TokenizerError::BadMetadata {
                key: "tokenizer.ggml.scores",
                what: "fewer scores than tokens".into(),
            });
        }
        if types.is_some_and(|t| t.len() < n_vocab) {
            return Err(TokenizerError::BadMetadata {
                key: "tokenizer.ggml.token_type",
                what: "fewer token types than tokens".into(),
            });
        }

        let mut tokens = Vec::with_capacity(n_vocab);
        let mut token_to_id = HashMap::with_capacity(n_vocab);
        for (i, v) in list.iter().enumerate() {
            let Value::String(s) = v else {
                return Err(TokenizerError::BadMetadata {
                    key: "tokenizer.ggml.tokens",
                    what: format!("entry {i} is not a string"),
                });
            };
            let text = if s.is_empty() {
                format!("[EMPTY_{i}]")
            } else {
                s.clone()
            };
            let score = scores.and_then(|s| s[i].as_f64()).unwrap_or(0.0) as f32;
            let attr = match types.map(|t| t[i].as_i64().unwrap_or(0)) {
                None => ATTR_NORMAL,
                Some(1) => ATTR_NORMAL,
                Some(2) => ATTR_UNKNOWN,
                Some(3) => ATTR_CONTROL,
                Some(4) => ATTR_USER_DEFINED,
                Some(5) => ATTR_UNUSED,
                Some(6) => ATTR_BYTE,
                Some(_) => 0,
            };
            token_to_id.insert(text.clone(), i as u32);
            tokens.push(TokenData { text, score, attr });
        }

        // Model type and its defaults.
        let (mut bos, mut eos, mut unk): (Option<u32>, Option<u32>, Option<u32>);
        let (mut add_bos, mut add_space_prefix);
        let model = match model_kind {
            "llama" => {
                (bos, eos, unk) = (Some(1), Some(2), Some(0));
                add_bos = true;
                add_space_prefix = true;
                Model::Spm
            }
            "gpt2" => {
                let cfg = pre_config(&pre).ok_or_else(|| {
                    TokenizerError::UnsupportedPre(pre.clone(), SUPPORTED_PRE.into())
                })?;
                (bos, eos, unk) = (if cfg.no_bos { None } else { Some(11) }, Some(11), None);
                add_bos = cfg.add_bos;
                add_space_prefix = false;
                let splitters = cfg
                    .exprs
                    .iter()
                    .map(|e| Splitter::new(e))
                    .collect::<Result<Vec<_>, _>>()?;
                let merges_list = meta_array(m, "tokenizer.ggml.merges")?
                    .ok_or(TokenizerError::MissingKey("tokenizer.ggml.merges"))?;
                let mut extra_syms: HashMap<String, u32> = HashMap::new();
                let mut merges = HashMap::with_capacity(merges_list.len());
                let intern = |s: &str, extra: &mut HashMap<String, u32>| -> u32 {
                    if let Some(&id) = token_to_id.get(s) {
                        return id;
                    }
                    let next = (n_vocab + extra.len()) as u32;
                    *extra.entry(s.to_string()).or_insert(next)
                };
                for (rank, v) in merges_list.iter().enumerate() {
                    let Value::String(w) = v else { continue };
                    // split at the first space after the first byte
                    let Some(p) = w.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else {
                        continue;
                    };
                    let (a, b) = (&w[..p], &w[p + 1..]);
                    if a.is_empty() || b.is_empty() {
                        continue;
                    }
                    let ia = intern(a, &mut extra_syms);
                    let ib = intern(b, &mut extra_syms);
                    let iab = intern(&format!("{a}{b}"), &mut extra_syms);
                    merges.entry((ia, ib)).or_insert((rank as u32, iab));
                }
                let byte_map = byte_to_unicode();
                let unicode_to_byte = byte_map
                    .iter()
                    .enumerate()
                    .map(|(b, &c)| (c, b as u8))
                    .collect();
                Model::Bpe(Box::new(Bpe {
                    splitters,
                    merges,
                    extra_syms,
                    ignore_merges: cfg.ignore_merges,
                    byte_map,
                    unicode_to_byte,
                }))
            }
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };
        if let Some(v) = meta_bool(m, "tokenizer.ggml.add_space_prefix") {
            add_space_prefix = v;
        }

        // Special token ids: defaults outside the vocabulary are dropped, keys inside it override.
        let in_vocab = |id: Option<u32>| id.filter(|&i| (i as usize) < n_vocab);
        let key_id = |key: &str| {
            m.get(key)
                .and_then(Value::as_u64)
                .filter(|&i| (i as usize) < n_vocab)
                .map(|i| i as u32)
        };
        bos = key_id("tokenizer.ggml.bos_token_id").or(in_vocab(bos));
        eos = key_id("tokenizer.ggml.eos_token_id").or(in_vocab(eos));
        unk = key_id("tokenizer.ggml.unknown_token_id").or(in_vocab(unk));
        let mut eot = key_id("tokenizer.ggml.eot_token_id");
        let mut eom = key_id("tokenizer.ggml.eom_token_id");
        let mut fim_pre =
            key_id("tokenizer.ggml.fim_pre_token_id").or(key_id("tokenizer.ggml.prefix_token_id"));
        let mut fim_suf =
            key_id("tokenizer.ggml.fim_suf_token_id").or(key_id("tokenizer.ggml.suffix_token_id"));
        let mut fim_mid =
            key_id("tokenizer.ggml.fim_mid_token_id").or(key_id("tokenizer.ggml.middle_token_id"));
        let mut fim_pad = key_id("tokenizer.ggml.fim_pad_token_id");
        let mut fim_rep = key_id("tokenizer.ggml.fim_rep_token_id");
        let mut fim_sep = key_id("tokenizer.ggml.fim_sep_token_id");

        if let Some(v) = meta_bool(m, "tokenizer.ggml.add_bos_token") {
            add_bos = v;
        }
        let add_eos = meta_bool(m, "tokenizer.ggml.add_eos_token").unwrap_or(false);

        // Recognise end-of-turn and fill-in-the-middle tokens by their text when the metadata does not
        // name them, and make sure they are control tokens.
        {
            const EOT: &[&str] = &[
                "<|eot_id|>",
                "<|im_end|>",
                "<|end|>",
                "<end_of_turn>",
                "<|endoftext|>",
                "<|end_of_text|>",
                "<EOT>",
                "_<EOT>",
                "[EOT]",
                "<｜end▁of▁sentence｜>",
                "<end_of_utterance>",
            ];
            const EOM: &[&str] = &["<|eom_id|>"];
            const PRE: &[&str] = &[
                "<|fim_prefix|>",
                "<fim-prefix>",
                "<fim_prefix>",
                "<｜fim▁begin｜>",
                "<PRE>",
                "▁<PRE>",
                "<|code_prefix|>",
                "<|prefix|>",
            ];
            const SUF: &[&str] = &[
                "<|fim_suffix|>",
                "<fim-suffix>",
                "<fim_suffix>",
                "<｜fim▁hole｜>",
                "<SUF>",
                "▁<SUF>",
                "<|code_suffix|>",
                "<|suffix|>",
            ];
            const MID: &[&str] = &[
                "<|fim_middle|>",
                "<fim-middle>",
                "<fim_middle>",
                "<｜fim▁end｜>",
                "<MID>",
                "▁<MID>",
                "<|code_middle|>",
                "<|middle|>",
            ];
            const PAD: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
            const REP: &[&str] = &[
                "<|fim_repo|>",
                "<|repo_name|>",
                "<fim-repo>",
                "<REPO>",
                "<reponame>",
            ];
            const SEP: &[&str] = &["<|file_sep|>"];
            let slots: [(&mut Option<u32>, &[&str]); 8] = [
                (&mut eot, EOT),
                (&mut eom, EOM),
                (&mut fim_pre, PRE),
                (&mut fim_suf, SUF),
                (&mut fim_mid, MID),
                (&mut fim_pad, PAD),
                (&mut fim_rep, REP),
                (&mut fim_sep, SEP),
            ];
            for (slot, names) in slots {
                if slot.is_some() {
                    continue;
                }
                if let Some(id) = (0..n_vocab).find(|&i| names.contains(&tokens[i].text.as_str())) {
                    *slot = Some(id as u32);
                    tokens[id].attr |= ATTR_CONTROL;
                }
            }
        }

        // Control tokens named "unused" are unused.
        for t in tokens.iter_mut() {
            if t.attr & ATTR_CONTROL != 0 && t.text.contains("unused") {
                t.attr |= ATTR_UNUSED;
            }
        }

        // End-of-generation tokens.
        let mut eog: HashSet<u32> = [fim_pad, fim_rep, fim_sep].into_iter().flatten().collect();
        const EOG_TEXT: &[&str] = &[
            "<|eot_id|>",
            "<|im_end|>",
            "<|end|>",
            "<|return|>",
            "<|call|>",
            "<|flush|>",
            "<|calls|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "</s>",
            "<|eom_id|>",
            "<EOT>",
            "_<EOT>",
            "[EOT]",
            "[EOS]",
            "<|end_of_text|>",
            "<end_of_utterance>",
            "<eos>",
            "<turn|>",
            "<|tool_response>",
            "<｜end▁of▁sentence｜>",
            "[e~[",
        ];
        for (i, t) in tokens.iter_mut().enumerate() {
            if EOG_TEXT.contains(&t.text.as_str()) {
                eog.insert(i as u32);
                t.attr |= ATTR_CONTROL;
            }
        }
        // gpt-oss: these are always rendered
        for t in tokens.iter_mut() {
            if matches!(
                t.text.as_str(),
                "<|channel|>" | "<|message|>" | "<|start|>" | "<|constrain|>"
            ) {
                t.attr = ATTR_USER_DEFINED;
            }
        }
        eog.extend([eos, eot, eom].into_iter().flatten());
        {
            let find = |s: &str| eog.iter().copied().find(|&i| tokens[i as usize].text == s);
            let (ret, call, calls, flush, end) = (
                find("<|return|>"),
                find("<|call|>"),
                find("<|calls|>"),
                find("<|flush|>"),
                find("<|end|>"),
            );
            let has_call = call.is_some() || calls.is_some();
            let normal_s = find("<|tool_response>").is_some() || find("<|plamo:eos|>").is_some();
            let s_tok = find("</s>");
            // harmony / solar-open: "<|end|>" ends a message, not the generation
            if let (true, Some(end)) = (has_call && (ret.is_some() || flush.is_some()), end) {
                eog.remove(&end);
                tokens[end as usize].attr = ATTR_USER_DEFINED;
            }
            // gemma4 / plamo: "</s>" is an ordinary token
            if let (true, Some(s)) = (normal_s, s_tok) {
                eog.remove(&s);
                tokens[s as usize].attr = ATTR_NORMAL;
            }
        }

        // Special tokens for the partition: longest text first.
        let mut special_order: Vec<u32> = (0..n_vocab as u32)
            .filter(|&i| {
                tokens[i as usize].attr & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0
            })
            .collect();
        special_order.sort_by(|&a, &b| {
            tokens[b as usize]
                .text
                .len()
                .cmp(&tokens[a as usize].text.len())
        });

        // Per-model attribute fix-ups.
        let model_name = meta_str(m, "general.name")?.unwrap_or("").to_lowercase();
        if model_name.contains("phi-3") || model_name.contains("phi3") {
            for &id in &special_order {
                tokens[id as usize].attr |= ATTR_RSTRIP;
            }
            if let Some(&id) = token_to_id.get("</s>") {
                tokens[id as usize].attr |= ATTR_RSTRIP;
            }
            for t in ["<unk>", "<s>", "<|endoftext|>"] {
                if let Some(&id) = token_to_id.get(t) {
                    tokens[id as usize].attr &= !ATTR_RSTRIP;
                }
            }
        }
        if ["jina-v2-de", "jina-v2-es", "jina-v2-code"]
            .iter()
            .any(|p| pre.contains(p))
        {
            if let Some(&id) = token_to_id.get("<mask>") {
                tokens[id as usize].attr |= ATTR_LSTRIP;
            }
        }

        let mut special_trie = Trie::default();
        let mut special_rank = HashMap::with_capacity(special_order.len());
        for (rank, &id) in special_order.iter().enumerate() {
            special_trie.insert(tokens[id as usize].text.as_bytes(), id);
            special_rank.insert(id, rank);
        }

        let mut tok = Tokenizer {
            model,
            tokens,
            token_to_id,
            pieces: Vec::new(),
            special_rank,
            special_trie,
            classifier: Classifier::new(),
            eog,
            bos,
            eos,
            eot,
            unk,
            add_bos,
            add_eos,
            add_space_prefix,
            model_name,
            pre_name: pre,
        };
        tok.pieces = (0..n_vocab as u32)
            .map(|id| tok.compute_piece(id))
            .collect();
        Ok(tok)
    }

    /// The bytes of a token with special tokens rendered (llama.cpp's token_to_piece with special=true).
    fn compute_piece(&self, id: u32) -> Vec<u8> {
        let t = &self.tokens[id as usize];
        if t.attr & (ATTR_HIDDEN | ATTR_USER_DEFINED) != 0 {
            return t.text.as_bytes().to_vec();
        }
        if t.attr & ATTR_NORMAL != 0 {
            return match &self.model {
                Model::Spm => t.text.replace(SPM_SPACE, " ").into_bytes(),
                Model::Bpe(bpe) => {
                    let mut out = Vec::with_capacity(t.text.len());
                    for c in t.text.chars() {
                        match bpe.unicode_to_byte.get(&c) {
                            Some(&b) => out.push(b),
                            None => {
                                out.extend_from_slice(b"[UNK_BYTE_0x");
                                let mut buf = [0u8; 4];
                                for b in c.encode_utf8(&mut buf).bytes() {
                                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                                }
                                out.extend_from_slice(t.text.as_bytes());
                                out.push(b']');
                            }
                        }
                    }
                    out
                }
            };
        }
        if t.attr & ATTR_BYTE != 0 {
            if let Some(b) = t
                .text
                .get(3..5)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                return vec![b];
            }
        }
        Vec::new()
    }

    // -----------------------------------------------------------------------------------------------
    // Encoding
    // -----------------------------------------------------------------------------------------------

    /// Tokenizes `text`. `add_special` adds BOS/EOS as the model asks (`tokenizer.ggml.add_bos_token`,
    /// `add_eos_token`); `parse_special` lets control-token texts in `text` (e.g. `<|im_start|>`) become
    /// those tokens. User-defined tokens are always matched.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        let frags = if text.is_empty() {
            Vec::new()
        } else {
            self.partition(text, parse_special)
        };
        let mut cache = HashMap::new();
        if add_special && self.add_bos {
            if let Some(b) = self.bos {
                out.push(b);
            }
        }
        match &self.model {
            Model::Spm => {
                let mut prev_special = true;
                for f in frags {
                    match f {
                        Frag::Text(a, b) => {
                            let mut s = String::with_capacity(b - a + 3);
                            if self.add_space_prefix && prev_special {
                                s.push(' ');
                            }
                            s.push_str(&text[a..b]);
                            let s = s.replace(' ', SPM_SPACE);
                            self.spm_encode(&s, &mut out);
                            prev_special = false;
                        }
                        Frag::Token(t) => {
                            out.push(t);
                            prev_special = true;
                        }
                    }
                }
            }
            Model::Bpe(bpe) => {
                for f in frags {
                    match f {
                        Frag::Text(a, b) => self.bpe_encode(bpe, &text[a..b], &mut cache, &mut out),
                        Frag::Token(t) => out.push(t),
                    }
                }
            }
        }
        if add_special && self.add_eos {
            if let Some(e) = self.eos {
                out.push(e);
            }
        }
        out
    }

    /// Splits `text` into raw-text fragments and special tokens. Special tokens are taken longest text
    /// first; for each, every raw fragment is scanned left to right for non-overlapping occurrences.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Frag> {
        let bytes = text.as_bytes();
        // all occurrences of all special tokens, by token
        let mut occ: HashMap<u32, Vec<usize>> = HashMap::new();
        for p in 0..bytes.len() {
            self.special_trie
                .matches_at(&bytes[p..], |id| occ.entry(id).or_default().push(p));
        }
        let mut frags = vec![Frag::Text(0, bytes.len())];
        if occ.is_empty() {
            return frags;
        }
        let mut found: Vec<(usize, u32)> = occ
            .keys()
            .map(|&id| (self.special_rank[&id], id))
            .filter(|&(_, id)| {
                parse_special || self.tokens[id as usize].attr & (ATTR_CONTROL | ATTR_UNKNOWN) == 0
            })
            .collect();
        found.sort_unstable();
        for (_, id) in found {
            let t = &self.tokens[id as usize];
            let len = t.text.len();
            let positions = &occ[&id];
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                let Frag::Text(start, end) = f else {
                    next.push(f);
                    continue;
                };
                let mut cursor = start;
                let mut i = positions.partition_point(|&p| p < cursor);
                while i < positions.len() {
                    let p = positions[i];
                    if p < cursor {
                        i += 1;
                        continue;
                    }
                    if p + len > end {
                        break;
                    }
                    let mut left_end = p;
                    if t.attr & ATTR_LSTRIP != 0 {
                        while left_end > cursor && is_c_space(bytes[left_end - 1]) {
                            left_end -= 1;
                        }
                    }
                    if left_end > cursor {
                        next.push(Frag::Text(cursor, left_end));
                    }
                    next.push(Frag::Token(id));
                    cursor = p + len;
                    if t.attr & ATTR_RSTRIP != 0 {
                        while cursor < end && is_c_space(bytes[cursor]) {
                            cursor += 1;
                        }
                    }
                    i += 1;
                }
                if cursor < end {
                    next.push(Frag::Text(cursor, end));
                }
            }
            frags = next;
        }
        frags
    }

    fn byte_token_spm(&self, b: u8) -> Option<u32> {
        let hex = format!("<0x{b:02X}>");
        if let Some(&id) = self.token_to_id.get(&hex) {
            return Some(id);
        }
        if b < 128 {
            if let Some(&id) = self
                .token_to_id
                .get((b as char).encode_utf8(&mut [0u8; 4]) as &str)
            {
                return Some(id);
            }
        }
        self.unk
    }

    fn spm_encode(&self, text: &str, out: &mut Vec<u32>) {
        #[derive(Clone, Copy)]
        struct Sym {
            start: usize,
            n: usize,
            prev: isize,
            next: isize,
        }
        struct Bigram {
            score: f32,
            left: usize,
            right: usize,
            size: usize,
        }
        impl PartialEq for Bigram {
            fn eq(&self, o: &Self) -> bool {
                self.cmp(o) == Ordering::Equal
            }
        }
        impl Eq for Bigram {}
        impl PartialOrd for Bigram {
            fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
                Some(self.cmp(o))
            }
        }
        impl Ord for Bigram {
            // highest score first, then leftmost
            fn cmp(&self, o: &Self) -> Ordering {
                self.score
                    .partial_cmp(&o.score)
                    .unwrap_or(Ordering::Equal)
                    .then(o.left.cmp(&self.left))
            }
        }

        let mut syms: Vec<Sym> = Vec::with_capacity(text.len());
        for (i, (b, c)) in text.char_indices().enumerate() {
            let n = c.len_utf8();
            syms.push(Sym {
                start: b,
                n,
                prev: i as isize - 1,
                next: if b + n == text.len() {
                    -1
                } else {
                    i as isize + 1
                },
            });
        }
        if syms.is_empty() {
            return;
        }
        let mut heap = BinaryHeap::new();
        let try_add = |syms: &[Sym], heap: &mut BinaryHeap<Bigram>, l: isize, r: isize| {
            if l < 0 || r < 0 {
                return;
            }
            let (l, r) = (l as usize, r as usize);
            let s = &text[syms[l].start..syms[l].start + syms[l].n + syms[r].n];
            if let Some(&id) = self.token_to_id.get(s) {
                heap.push(Bigram {
                    score: self.tokens[id as usize].score,
                    left: l,
                    right: r,
                    size: s.len(),
                });
            }
        };
        for i in 1..syms.len() {
            try_add(&syms, &mut heap, i as isize - 1, i as isize);
        }
        while let Some(bg) = heap.pop() {
            let (l, r) = (bg.left, bg.right);
            if syms[l].n == 0 || syms[r].n == 0 || syms[l].n + syms[r].n != bg.size {
                continue;
            }
            syms[l].n += syms[r].n;
            syms[r].n = 0;
            syms[l].next = syms[r].next;
            let rn = syms[r].next;
            if rn >= 0 {
                syms[rn as usize].prev = l as isize;
            }
            let (p, nx) = (syms[l].prev, syms[l].next);
            try_add(&syms, &mut heap, p, l as isize);
            try_add(&syms, &mut heap, l as isize, nx);
        }
        let mut i = 0isize;
        while i >= 0 {
            let s = syms[i as usize];
            let piece = &text[s.start..s.start + s.n];
            match self.token_to_id.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        if let Some(id) = self.byte_token_spm(b) {
                            out.push(id);
                        }
                    }
                }
            }
            i = s.next;
        }
    }

    fn bpe_encode(
        &self,
        bpe: &Bpe,
        text: &str,
        cache: &mut HashMap<char, CFlags>,
        out: &mut Vec<u32>,
    ) {
        let cs: Vec<char> = text.chars().collect();
        let fl: Vec<CFlags> = cs
            .iter()
            .map(|&c| self.classifier.classify(c, cache))
            .collect();
        let mut pieces = vec![(0usize, cs.len())];
        for sp in &bpe.splitters {
            pieces = sp.split(&cs, &fl, &pieces);
        }
        // byte offsets of code points, to slice the text
        let mut offs = Vec::with_capacity(cs.len() + 1);
        let mut o = 0;
        for c in &cs {
            offs.push(o);
            o += c.len_utf8();
        }
        offs.push(o);
        let mut word = String::new();
        for (a, b) in pieces {
            if a >= b {
                continue;
            }
            word.clear();
            for &byte in &text.as_bytes()[offs[a]..offs[b]] {
                word.push(bpe.byte_map[byte as usize]);
            }
            self.bpe_word(bpe, &word, out);
        }
    }

    fn sym_id(&self, bpe: &Bpe, s: &str) -> Option<u32> {
        self.token_to_id
            .get(s)
            .or_else(|| bpe.extra_syms.get(s))
            .copied()
    }

    /// Applies the merges to one pre-tokenized, byte-mapped word.
    fn bpe_word(&self, bpe: &Bpe, word: &str, out: &mut Vec<u32>) {
        const NONE: u32 = u32::MAX;
        if bpe.ignore_merges {
            if let Some(&id) = self.token_to_id.get(word) {
                out.push(id);
                return;
            }
        }
        struct Sym {
            start: usize,
            end: usize,
            id: u32,
            prev: isize,
            next: isize,
        }
        let mut syms: Vec<Sym> = Vec::with_capacity(word.len());
        let n_chars = word.chars().count();
        for (i, (b, c)) in word.char_indices().enumerate() {
            let end = b + c.len_utf8();
            let id = self.sym_id(bpe, &word[b..end]).unwrap_or(NONE);
            syms.push(Sym {
                start: b,
                end,
                id,
                prev: i as isize - 1,
                next: if i + 1 == n_chars { -1 } else { i as isize + 1 },
            });
        }
        // (rank, left, right, left id, right id), smallest rank then leftmost first
        type Queue = BinaryHeap<Reverse<(u32, usize, usize, u32, u32)>>;
        let mut heap: Queue = BinaryHeap::new();
        let try_add = |syms: &[Sym], heap: &mut Queue, l: isize, r: isize| {
            if l < 0 || r < 0 {
                return;
            }
            let (l, r) = (l as usize, r as usize);
            let (a, b) = (syms[l].id, syms[r].id);
            if a == NONE || b == NONE {
                return;
            }
            if let Some(&(rank, _)) = bpe.merges.get(&(a, b)) {
                heap.push(Reverse((rank, l, r, a, b)));
            }
        };
        for i in 1..syms.len() {
            try_add(&syms, &mut heap, i as isize - 1, i as isize);
        }
        while let Some(Reverse((_, l, r, a, b))) = heap.pop() {
            if syms[l].id != a
                || syms[r].id != b
                || syms[l].end == syms[l].start
                || syms[r].end == syms[r].start
            {
                continue;
            }
            if syms[l].next != r as isize {
                continue;
            }
            let merged = bpe.merges[&(a, b)].1;
            syms[l].end = syms[r].end;
            syms[l].id = merged;
            syms[r].end = syms[r].start;
            syms[r].id = NONE;
            let rn = syms[r].next;
            syms[l].next = rn;
            if rn >= 0 {
                syms[rn as usize].prev = l as isize;
            }
            let (p, nx) = (syms[l].prev, syms[l].next);
            try_add(&syms, &mut heap, p, l as isize);
            try_add(&syms, &mut heap, l as isize, nx);
        }
        let n_vocab = self.tokens.len() as u32;
        let mut i = if syms.is_empty() { -1 } else { 0isize };
        while i >= 0 {
            let s = &syms[i as usize];
            if s.id < n_vocab {
                out.push(s.id);
            } else {
                // not a token: fall back to tokens for single bytes of the mapped text, where they exist
                for &b in &word.as_bytes()[s.start..s.end] {
                    if b < 128 {
                        if let Some(&id) = self
                            .token_to_id
                            .get((b as char).encode_utf8(&mut [0u8; 4]) as &str)
                        {
                            out.push(id);
                        }
                    }
                }
            }
            i = s.next;
        }
    }

    // -----------------------------------------------------------------------------------------------
    // Decoding and vocabulary queries
    // -----------------------------------------------------------------------------------------------

    /// The bytes a token stands for. Control and unknown tokens are empty unless `render_special`.
    pub fn token_bytes(&self, id: u32, render_special: bool) -> Vec<u8> {
        self.piece(id, render_special).to_vec()
    }

    fn piece(&self, id: u32, render_special: bool) -> &[u8] {
        let Some(t) = self.tokens.get(id as usize) else {
            return &[];
        };
        if !render_special && t.attr & ATTR_HIDDEN != 0 {
            return &[];
        }
        &self.pieces[id as usize]
    }

    /// Text of a token sequence (invalid UTF-8 replaced). Models that prefix a space when encoding
    /// (`add_space_prefix`) have it removed from the first token after an optional leading BOS; no other
    /// clean-up is applied, so `decode(encode(text))` gives `text` back.
    pub fn decode(&self, ids: &[u32], render_special: bool) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        let first_text = usize::from(ids.first().is_some_and(|&i| Some(i) == self.bos));
        for (i, &id) in ids.iter().enumerate() {
            let p = self.piece(id, render_special);
            if i == first_text && self.add_space_prefix && p.first() == Some(&b' ') {
                bytes.extend_from_slice(&p[1..]);
            } else {
                bytes.extend_from_slice(p);
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// End-of-turn token (`tokenizer.ggml.eot_token_id`, or recognised by its text).
    pub fn eot_id(&self) -> Option<u32> {
        self.eot
    }

    pub fn unk_id(&self) -> Option<u32> {
        self.unk
    }

    /// Whether `encode(.., add_special = true, ..)` prepends BOS / appends EOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    pub fn adds_eos(&self) -> bool {
        self.add_eos
    }

    /// Whether generation stops at this token (EOS, EOT, and the end-of-turn tokens llama.cpp knows
    /// by text).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// All end-of-generation tokens, ascending.
    pub fn eog_ids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.eog.iter().copied().collect();
        v.sort_unstable();
        v
    }

    /// Whether the token is a control token (rendered only on request).
    pub fn is_control(&self, id: u32) -> bool {
        self.tokens
            .get(id as usize)
            .is_some_and(|t| t.attr & ATTR_CONTROL != 0)
    }

    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(|t| t.text.as_str())
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// `tokenizer.ggml.pre` as found in the file ("" when absent).
    pub fn pre_tokenizer(&self) -> &str {
        &self.pre_name
    }

    /// "gpt2" (byte-level BPE) or "llama" (SentencePiece-style).
    pub fn model_type(&self) -> &'static str {
        match self.model {
            Model::Bpe(_) => "gpt2",
            Model::Spm => "llama",
        }
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("model", &self.model_type())
            .field("pre", &self.pre_name)
            .field("name", &self.model_name)
            .field("vocab_size", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

/// Turns generated token ids into text incrementally: `push` returns only complete UTF-8, holding back
/// the bytes of a character that a later token finishes. Bytes that can never form valid UTF-8 come out
/// as U+FFFD.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    pending: Vec<u8>,
    render_special: bool,
}

impl<'a> StreamDecoder<'a> {
    /// A decoder that leaves control tokens out of the text.
    pub fn new(tok: &'a Tokenizer) -> Self {
        Self {
            tok,
            pending: Vec::new(),
            render_special: false,
        }
    }

    /// A decoder that renders control tokens as their text when `render_special`.
    pub fn with_special(tok: &'a Tokenizer, render_special: bool) -> Self {
        Self {
            tok,
            pending: Vec::new(),
            render_special,
        }
    }

    pub fn push(&mut self, id: u32) -> String {
        self.pending
            .extend_from_slice(self.tok.piece(id, self.render_special));
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The bytes before valid_up_to() are valid UTF-8: always Ok.
                    if let Ok(s) = std::str::from_utf8(&self.pending[..valid]) {
                        out.push_str(s);
                    }
                    match e.error_len() {
                        Some(n) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + n);
                        }
                        None => {
                            // an incomplete character at the end: wait for more bytes
                            self.pending.drain(..valid);
                            break;
                        }
                    }
                }
            }
        }
        out
    }

    /// Emits whatever is held back (as U+FFFD if it is an incomplete character).
    pub fn flush(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test
mod tests {
    use super::*;

    fn strs(v: &[&str]) -> Value {
        Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
    }

    /// A tiny byte-level BPE vocabulary: all 256 byte symbols, a few merges, two control tokens.
    fn tiny_bpe(pre: &str) -> Tokenizer {
        let map = byte_to_unicode();
        let mut toks: Vec<String> = map.iter().map(|c| c.to_string()).collect();
        let merges = [
            "Ġ t", "h e", "Ġt he", "l l", "ll o", "he llo", "Ġ w", "o r", "Ġw or", "Ġwor l",
            "Ġworl d",
        ];
        for m in merges {
            toks.push(m.replace(' ', ""));
        }
        toks.push("<|im_start|>".into());
        toks.push("<|im_end|>".into());
        let n = toks.len();
        let mut types = vec![Value::I32(1); n];
        types[n - 2] = Value::I32(3);
        types[n - 1] = Value::I32(3);
        let mut m = BTreeMap::new();
        m.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
        m.insert("tokenizer.ggml.pre".into(), Value::String(pre.into()));
        m.insert(
            "tokenizer.ggml.tokens".into(),
            Value::Array(toks.into_iter().map(Value::String).collect()),
        );
        m.insert("tokenizer.ggml.token_type".into(), Value::Array(types));
        m.insert("tokenizer.ggml.merges".into(), strs(&merges));
        m.insert(
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(n as u32 - 1),
        );
        Tokenizer::from_metadata(&m).unwrap()
    }

    fn pieces(sp: &Splitter, tok: &Tokenizer, text: &str) -> Vec<String> {
        let cs: Vec<char> = text.chars().collect();
        let mut cache = HashMap::new();
        let fl: Vec<CFlags> = cs
            .iter()
            .map(|&c| tok.classifier.classify(c, &mut cache))
            .collect();
        sp.split(&cs, &fl, &[(0, cs.len())])
            .into_iter()
            .map(|(a, b)| cs[a..b].iter().collect())
            .collect()
    }

    #[test]
    fn hand_written_splitters_agree_with_their_expressions() {
        let tok = tiny_bpe("qwen2");
        let texts = [
            "Hello world, it's 12345 o'clock!!\n\n\n  c",
            "a   b\n\n\n  c",
            "  leading and trailing   ",
            "tabs\t\tand\r\nCRLF\r\n\r\n  x",
            "ação, não, coração, São Paulo",
            "emoji 🚀👍🏽 ok",
            "WE'RE HERE'S 'LL 'd x'",
            "x = [1, 2]  # comment\n    return   y;\n\t\tz",
            "3.14159 1234567 ١٢٣",
            "   ",
            " ",
            "\n",
            "a\u{3000}\u{3000}b \u{a0} c",
            "foo!!! ?? \n\n!",
        ];
        // the regex engine over collapsed text is the reference for the hand-written scanners
        for (expr, fast) in [
            (RE_GPT2, Splitter::Gpt2),
            (RE_LLAMA3, Splitter::Llama3 { max_digits: 3 }),
            (RE_QWEN2, Splitter::Llama3 { max_digits: 1 }),
            (RE_DIGIT, Splitter::Digits),
        ] {
            let src = collapse_regex(expr).unwrap();
            // GPT-2's expression leaves a lone whitespace unmatched; llama.cpp's scanner makes it a piece
            let src = if expr == RE_GPT2 {
                format!("{src}|\\s+")
            } else {
                src
            };
            let slow = Splitter::Regex {
                re: fancy_regex::Regex::new(&src).unwrap(),
                collapsed: true,
            };
            for t in texts {
                assert_eq!(
                    pieces(&fast, &tok, t),
                    pieces(&slow, &tok, t),
                    "expr {expr} on {t:?}"
                );
            }
        }
    }

    #[test]
    fn bpe_merges_by_rank_and_round_trips() {
        let tok = tiny_bpe("gpt-2");
        let ids = tok.encode("hello the world", false, false);
        let texts: Vec<&str> = ids.iter().map(|&i| tok.token_text(i).unwrap()).collect();
        assert_eq!(texts, ["hello", "Ġthe", "Ġworld"]);
        for t in ["hello the world", "ação 🚀\n\n  x\t", "", "   "] {
            assert_eq!(tok.decode(&tok.encode(t, true, false), false), t);
        }
    }

    #[test]
    fn special_tokens_are_parsed_only_when_asked() {
        let tok = tiny_bpe("gpt-2");
        let start = tok.token_id("<|im_start|>").unwrap();
        let end = tok.token_id("<|im_end|>").unwrap();
        let ids = tok.encode("<|im_start|>hello<|im_end|>", false, true);
        assert_eq!(ids.first(), Some(&start));
        assert_eq!(ids.last(), Some(&end));
        assert_eq!(ids.len(), 3);
        let raw = tok.encode("<|im_start|>hello<|im_end|>", false, false);
        assert!(!raw.contains(&start) && raw.len() > 3);
        assert!(tok.is_eog(end));
        assert!(!tok.is_eog(start));
        assert_eq!(tok.decode(&ids, false), "hello");
        assert_eq!(tok.decode(&ids, true), "<|im_start|>hello<|im_end|>");
    }

    fn tiny_spm() -> Tokenizer {
        let mut toks: Vec<(String, f32, i32)> = vec![
            ("<unk>".into(), 0.0, 2),
            ("<s>".into(), 0.0, 3),
            ("</s>".into(), 0.0, 3),
        ];
        for b in 0..256 {
            toks.push((format!("<0x{b:02X}>"), 0.0, 6));
        }
        for (t, s) in [
            ("▁", -1.0),
            ("h", -2.0),
            ("e", -2.0),
            ("l", -2.0),
            ("o", -2.0),
            ("▁h", -3.0),
            ("ll", -3.0),
            ("▁he", -4.0),
            ("llo", -4.0),
            ("▁hello", -5.0),
        ] {
            toks.push((t.into(), s, 1));
        }
        toks.push(("<start_of_turn>".into(), 0.0, 3));
        let mut m = BTreeMap::new();
        m.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        m.insert(
            "tokenizer.ggml.tokens".into(),
            Value::Array(toks.iter().map(|t| Value::String(t.0.clone())).collect()),
        );
        m.insert(
            "tokenizer.ggml.scores".into(),
            Value::Array(toks.iter().map(|t| Value::F32(t.1)).collect()),
        );
        m.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array(toks.iter().map(|t| Value::I32(t.2)).collect()),
        );
        Tokenizer::from_metadata(&m).unwrap()
    }

    #[test]
    fn spm_merges_by_score_with_byte_fallback() {
        let tok = tiny_spm();
        let ids = tok.encode("hello", true, false);
        assert_eq!(ids[0], 1);
        assert_eq!(tok.token_text(ids[1]), Some("▁hello"));
        assert_eq!(ids.len(), 2);
        // "é" is not in the vocabulary: two byte tokens
        let ids = tok.encode("é", false, false);
        let texts: Vec<&str> = ids.iter().map(|&i| tok.token_text(i).unwrap()).collect();
        assert_eq!(texts, ["▁", "<0xC3>", "<0xA9>"]);
        assert_eq!(tok.decode(&ids, false), "é");
        assert_eq!(
            tok.decode(&tok.encode("hello héllo", false, false), false),
            "hello héllo"
        );
        assert_eq!(
            tok.decode(&tok.encode("hello héllo", true, false), false),
            "hello héllo"
        );
        assert_eq!(
            tok.decode(&tok.encode("hello", true, false), true),
            "<s>hello"
        );
        // a space prefix again after a special token
        let ids = tok.encode("<start_of_turn>hello", false, true);
        assert_eq!(tok.token_text(ids[1]), Some("▁hello"));
        assert!(tok.is_eog(2));
    }

    #[test]
    fn stream_decoder_holds_back_partial_characters() {
        let tok = tiny_spm();
        let ids = tok.encode("é🚀x", false, false);
        let mut d = StreamDecoder::new(&tok);
        let mut out = String::new();
        for &id in &ids {
            let s = d.push(id);
            assert!(!s.contains('\u{FFFD}'));
            out.push_str(&s);
        }
        out.push_str(&d.flush());
        assert_eq!(out, " é🚀x");
        let bad = tok.token_id("<0xFF>").unwrap();
        assert_eq!(d.push(bad), "\u{FFFD}");
        let lead = tok.token_id("<0xC3>").unwrap();
        assert_eq!(d.push(lead), "");
        assert_eq!(d.flush(), "\u{FFFD}");
    }

    #[test]
    fn unsupported_models_are_named() {
        let mut m = BTreeMap::new();
        m.insert("tokenizer.ggml.model".into(), Value::String("t5".into()));
        m.insert("tokenizer.ggml.tokens".into(), strs(&["a"]));
        let e = Tokenizer::from_metadata(&m).unwrap_err().to_string();
        assert!(e.contains("\"t5\"") && e.contains("gpt2, llama"), "{e}");
        m.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
        m.insert(
            "tokenizer.ggml.pre".into(),
            Value::String("nonesuch".into()),
        );
        m.insert("tokenizer.ggml.merges".into(), strs(&[]));
        let e = Tokenizer::from_metadata(&m).unwrap_err().to_string();
        assert!(e.contains("nonesuch") && e.contains("qwen2"), "{e}");
    }

    #[test]
    fn collapsed_regex_rewrites_categories() {
        let r = collapse_regex(r" ?[^\s\p{L}\p{N}]+|\p{N}").unwrap();
        assert_eq!(
            r,
            r" ?[^\s\x{E0D2}\x41-\x5A\x61-\x7A\x{E0D1}\x30-\x39]+|[\x{E0D1}\x30-\x39]"
        );
        assert!(collapse_regex("[0-9]+").is_none());
    }

    #[test]
    fn every_supported_pre_tokenizer_compiles() {
        for pre in [
            "default",
            "llama-bpe",
            "dbrx",
            "chatglm-bpe",
            "gpt-2",
            "smollm",
            "qwen2",
            "qwen35",
            "falcon",
            "deepseek-v3",
            "bloom",
            "viking",
            "tekken",
            "gpt-4o",
            "chameleon",
        ] {
            let cfg = pre_config(pre).unwrap();
            for e in cfg.exprs {
                Splitter::new(e).unwrap_or_else(|err| panic!("{pre}: {err}"));
            }
        }
    }
}
