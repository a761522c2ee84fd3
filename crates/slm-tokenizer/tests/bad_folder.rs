//! Tokenizer files that are missing or broken: errors that name the file.

use slm_tokenizer::Tokenizer;

fn err(dir: &std::path::Path) -> String {
    match Tokenizer::from_folder(dir) {
        Ok(_) => panic!("{} gave a tokenizer", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_or_corrupt_tokenizer_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let e = err(dir.path());
    assert!(e.contains("tokenizer.json"), "{e}");

    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 7").unwrap();
    let e = err(dir.path());
    assert!(e.contains("tokenizer.json"), "{e}");

    let ok = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
        "normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":null,
        "model":{"type":"WordLevel","vocab":{"a":0,"<unk>":1},"unk_token":"<unk>"}}"#;
    std::fs::write(dir.path().join("tokenizer.json"), ok).unwrap();
    assert!(Tokenizer::from_folder(dir.path()).is_ok());

    std::fs::write(dir.path().join("tokenizer_config.json"), "not json").unwrap();
    let e = err(dir.path());
    assert!(e.contains("tokenizer_config.json"), "{e}");

    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"chat_template": "{% for m in messages %}{{ m.content }"}"#,
    )
    .unwrap();
    let e = err(dir.path());
    assert!(e.contains("tokenizer_config.json"), "{e}");
}
