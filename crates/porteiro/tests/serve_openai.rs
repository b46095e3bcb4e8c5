//! The real `porteiro serve` binary on loopback, driven by the official `openai` Python package
//! (scripts/openai_e2e.py): chat, completions, embeddings, models, every error status, client
//! disconnect and a bounded load test. Then graceful shutdown: SIGTERM while a stream is in flight lets
//! it finish and the process exits 0.
//!
//! Skipped with a message when the models or the `openai` package are missing, unless
//! PORTEIRO_REQUIRE_MODELS=1 (scripts/test-setup.sh installs both).
// Tests may unwrap, expect and print (the lint policy is for library code).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MODEL: &str = "smollm2-135m";

fn required() -> bool {
    std::env::var("PORTEIRO_REQUIRE_MODELS").is_ok()
}

fn skip(why: &str) {
    assert!(!required(), "required but missing: {why}");
    eprintln!("skipping: {why}");
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `porteiro serve --port 0` with a config file and reads the bound port from its first line.
fn start(dir: &Path, name: &str, toml: &str) -> Server {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, toml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_porteiro"))
        .args(["serve", "--port", "0", "--model", MODEL, "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let port: u16 = line
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        let _ = out.read_to_string(&mut sink);
    });
    let s = Server { child, port };
    let t0 = Instant::now();
    while http_get(port, "/health")
        .map(|r| !r.starts_with("HTTP/1.1 200"))
        .unwrap_or(true)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{name} not ready in 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    s
}

fn http(port: u16, raw: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(raw.as_bytes())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    Ok(buf)
}

fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    http(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
    )
}

fn python_has_openai() -> bool {
    Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn openai_sdk_against_the_real_server() {
    for m in [MODEL, "minilm-l6"] {
        if let Err(e) = porteiro_models::fetch::resolve_model(m, false) {
            return skip(&format!("{m} not cached: {e}"));
        }
    }
    if !python_has_openai() {
        return skip("python3 with the `openai` package (pip install openai)");
    }
    let dir = tempfile::tempdir().unwrap();
    let main = start(
        dir.path(),
        "main",
        "[server]\nmax_body_bytes = 65536\n[model]\nctx = 1024\nthreads = 2\n\
         [limits]\nmax_seqs = 32\nmax_queue = 64\n",
    );
    let limited = start(
        dir.path(),
        "limited",
        "[server]\napi_keys = [\"sk-test\"]\nshutdown_grace_s = 30\n[model]\nctx = 1024\nthreads = 2\n\
         [embeddings]\nmodel = \"\"\n[limits]\nmax_seqs = 1\nmax_queue = 0\n",
    );
    let status = Command::new("python3")
        .arg(repo_root().join("scripts/openai_e2e.py"))
        .args(["--base", &format!("http://127.0.0.1:{}", main.port)])
        .args(["--limited", &format!("http://127.0.0.1:{}", limited.port)])
        .args(["--pid", &main.child.id().to_string(), "--ctx", "1024"])
        .status()
        .unwrap();
    assert!(status.success(), "scripts/openai_e2e.py failed");
    graceful_shutdown_lets_the_stream_finish(limited);
}

/// SIGTERM with a stream in flight: the stream still ends with `[DONE]`, new connections are
/// refused, and the process exits 0.
fn graceful_shutdown_lets_the_stream_finish(mut s: Server) {
    let port = s.port;
    let body = format!(
        "{{\"model\":\"{MODEL}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Tell a story.\"}}],\
         \"max_tokens\":48,\"stream\":true,\"ignore_eos\":true}}"
    );
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer sk-test\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    conn.write_all(req.as_bytes()).unwrap();
    let mut first = [0u8; 256];
    let n = conn.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    let pid = s.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut rest = String::new();
    conn.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("data: [DONE]"), "stream cut short: {rest}");
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
    let t0 = Instant::now();
    let code = loop {
        if let Some(c) = s.child.try_wait().unwrap() {
            break c;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success(), "exit status {code}");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}
