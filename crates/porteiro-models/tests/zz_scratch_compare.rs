// TEMPORARY scratch comparison (to be deleted)
use porteiro_models::gguf::GgufFile;
use porteiro_models::tokenizer::Tokenizer;
#[test]
fn scratch() {
    let dir = std::path::Path::new("/tmp/cmp");
    let mut bad = 0;
    for alias in ["smollm2-135m", "qwen2.5-0.5b", "gemma3-270m"] {
        let mdir = std::path::PathBuf::from(std::env::var("HOME").unwrap())
            .join(".cache/porteiro/models")
            .join(alias);
        let f = std::fs::read_dir(&mdir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "gguf"))
            .unwrap();
        let tok = Tokenizer::from_gguf(&GgufFile::open(&f).unwrap()).unwrap();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if !name.starts_with(alias) || !name.ends_with(".input") {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            let ids: Vec<u32> =
                serde_json::from_str(&std::fs::read_to_string(p.with_extension("ids")).unwrap())
                    .unwrap();
            let ps = name.contains(".ps.");
            let ours = tok.encode(&text, tok.adds_bos(), ps);
            if ours == ids {
                eprintln!("{name}: OK ({} ids)", ids.len());
                continue;
            }
            bad += 1;
            let at = ours
                .iter()
                .zip(&ids)
                .position(|(a, b)| a != b)
                .unwrap_or(ours.len().min(ids.len()));
            let lo = at.saturating_sub(8);
            let sh = |v: &[u32]| {
                v.iter()
                    .map(|&i| format!("{i}:{:?}", tok.token_text(i).unwrap()))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            eprintln!("{name}: MISMATCH at {at} (ours {} ref {})\n ours: {}\n  ref: {}\n text around: {:?}", ours.len(), ids.len(),
                sh(&ours[lo..(at+8).min(ours.len())]), sh(&ids[lo..(at+8).min(ids.len())]),
                tok.decode(&ids[lo..(at+8).min(ids.len())], true));
        }
    }
    assert_eq!(bad, 0);
}
#[test]
fn scratch_load_time() {
    for alias in ["smollm2-135m", "qwen2.5-0.5b", "gemma3-270m"] {
        let mdir = std::path::PathBuf::from(std::env::var("HOME").unwrap())
            .join(".cache/porteiro/models")
            .join(alias);
        let f = std::fs::read_dir(&mdir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "gguf"))
            .unwrap();
        let t0 = std::time::Instant::now();
        let g = GgufFile::open(&f).unwrap();
        let t1 = t0.elapsed();
        let tok = Tokenizer::from_gguf(&g).unwrap();
        eprintln!(
            "{alias}: gguf open {:?}, tokenizer {:?}, eog {:?}",
            t1,
            t0.elapsed() - t1,
            tok.eog_ids()
                .iter()
                .map(|&i| tok.token_text(i).unwrap().to_string())
                .collect::<Vec<_>>()
        );
    }
}
