//! Corpus reading, shard preparation and the checks on the way back in.

use std::path::{Path, PathBuf};

use slm_data::{prepare, read_corpus, DataError, Dataset, PrepareOptions, ShardInfo};

/// A byte-level "tokenizer": id = byte, EOS = 256.
fn encode(t: &str) -> Result<Vec<u32>, String> {
    Ok(t.bytes().map(u32::from).collect())
}

fn info(hash: u8) -> ShardInfo {
    ShardInfo {
        vocab: 257,
        eos: 256,
        tokenizer_sha256: [hash; 32],
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, bytes).unwrap();
    p
}

fn docs_of(ds: &[slm_data::Shard], eos: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    for s in ds {
        for i in 0..s.len() {
            let t = s.get(i).unwrap();
            if t == eos {
                out.push(String::from_utf8(std::mem::take(&mut cur)).unwrap());
            } else {
                cur.push(t as u8);
            }
        }
    }
    assert!(cur.is_empty(), "every document ends with EOS");
    out
}

#[test]
fn folders_files_and_jsonl_become_documents() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "c/b.txt", b"second");
    write(d.path(), "c/a.md", b"first");
    write(d.path(), "c/sub/z.txt", b"third");
    write(d.path(), "c/skip.bin", b"\0\0");
    write(d.path(), "c/empty.txt", b"  \n");
    let j = write(
        d.path(),
        "d.jsonl",
        b"{\"text\": \"j1\"}\n\n{\"text\": \"j2\", \"x\": 1}\n",
    );
    let docs = read_corpus(&[d.path().join("c"), j]).unwrap();
    let texts: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
    assert_eq!(texts, ["first", "second", "third", "j1", "j2"]);
    assert!(docs[4].source.ends_with("d.jsonl:3"));
}

#[test]
fn junk_and_empty_corpora_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let bin = write(d.path(), "x.txt", b"text then \x00\x01\x02 binary");
    let e = read_corpus(&[bin]).unwrap_err().to_string();
    assert!(
        e.contains("x.txt") && e.contains("NUL byte at offset 10"),
        "{e}"
    );
    let latin1 = write(d.path(), "l.txt", b"caf\xe9");
    let e = read_corpus(&[latin1]).unwrap_err().to_string();
    assert!(
        e.contains("l.txt") && e.contains("invalid UTF-8 at byte 3"),
        "{e}"
    );
    let empty = write(d.path(), "e.txt", b"\n\n");
    let e = read_corpus(&[empty]).unwrap_err();
    assert!(matches!(e, DataError::Empty(_)), "{e}");
    let j = write(
        d.path(),
        "b.jsonl",
        b"{\"text\": \"ok\"}\n{\"txt\": \"no\"}\n",
    );
    let e = read_corpus(&[j]).unwrap_err().to_string();
    assert!(e.contains("b.jsonl:2") && e.contains("\"text\""), "{e}");
    let e = read_corpus(&[d.path().join("missing.txt")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.txt"), "{e}");
}

#[test]
fn shards_hold_every_document_once_split_by_document() {
    let d = tempfile::tempdir().unwrap();
    let texts: Vec<String> = (0..60).map(|i| format!("document {i} ü")).collect();
    let docs: Vec<slm_data::Document> = texts
        .iter()
        .map(|t| slm_data::Document {
            source: "mem".into(),
            text: t.clone(),
        })
        .collect();
    let opts = PrepareOptions {
        valid_fraction: 0.2,
        seed: 3,
        shard_tokens: 100, // several shard files
    };
    let out = d.path().join("shards");
    let m = prepare(&docs, &encode, &info(7), &out, &opts, &mut |_| {}).unwrap();
    assert!(m.train.files.len() > 1);
    let ds = Dataset::open(&out, &[7; 32]).unwrap();
    let train = docs_of(&ds.train, 256);
    let valid = docs_of(&ds.valid, 256);
    assert_eq!(train.len() as u64, m.train.documents);
    assert!(!valid.is_empty() && valid.len() < 25, "{}", valid.len());
    let mut all: Vec<String> = train.iter().chain(&valid).cloned().collect();
    all.sort();
    let mut want = texts.clone();
    want.sort();
    assert_eq!(all, want);
    let total: usize = ds.train.iter().map(|s| s.len()).sum();
    assert_eq!(total as u64, m.train.tokens);

    // The same seed gives the same split; the fingerprint follows the text.
    let out2 = d.path().join("again");
    let m2 = prepare(&docs, &encode, &info(7), &out2, &opts, &mut |_| {}).unwrap();
    assert_eq!(m, m2);

    // One document: its tail is the validation set.
    let one = [slm_data::Document {
        source: "book".into(),
        text: "para one.\n\npara two.\n\npara three.\n\npara four.".into(),
    }];
    let out3 = d.path().join("one");
    prepare(
        &one,
        &encode,
        &info(7),
        &out3,
        &PrepareOptions {
            valid_fraction: 0.3,
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap();
    let ds = Dataset::open(&out3, &[7; 32]).unwrap();
    // Cut at the last paragraph break before 70% of the text.
    assert_eq!(docs_of(&ds.valid, 256), ["para three.\n\npara four."]);

    // One long book among short speeches: the book is split too, not held out whole.
    let book: String = (0..200).map(|i| format!("chapter {i}.\n\n")).collect();
    let mut mixed = docs.clone();
    mixed.push(slm_data::Document {
        source: "book".into(),
        text: book.clone(),
    });
    let out4 = d.path().join("mixed");
    prepare(&mixed, &encode, &info(7), &out4, &opts, &mut |_| {}).unwrap();
    let ds = Dataset::open(&out4, &[7; 32]).unwrap();
    let (train, valid) = (docs_of(&ds.train, 256), docs_of(&ds.valid, 256));
    let head = train.iter().find(|t| t.starts_with("chapter 0.")).unwrap();
    let tail = valid.iter().find(|t| t.starts_with("chapter ")).unwrap();
    assert_eq!(format!("{head}{tail}"), book);
    assert!(tail.len() * 4 < book.len() && tail.len() * 6 > book.len());
    // The short documents are still split whole by the seeded hash, as before.
    let short_valid: Vec<&String> = valid.iter().filter(|t| t.starts_with("document")).collect();
    let before = docs_of(&Dataset::open(&out, &[7; 32]).unwrap().valid, 256);
    assert_eq!(short_valid, before.iter().collect::<Vec<_>>());
}

#[test]
fn wrong_tokenizer_and_damaged_shards_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let docs = vec![
        slm_data::Document {
            source: "a".into(),
            text: "alpha".into(),
        },
        slm_data::Document {
            source: "b".into(),
            text: "beta".into(),
        },
    ];
    let out = d.path().join("s");
    let m = prepare(
        &docs,
        &encode,
        &info(1),
        &out,
        &PrepareOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    let e = Dataset::open(&out, &[2; 32]).err().unwrap().to_string();
    assert!(
        e.contains("tokenizer") && e.contains("slm data prepare"),
        "{e}"
    );

    let shard = out.join(&m.train.files[0]);
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 1]).unwrap();
    let e = Dataset::open(&out, &[1; 32]).err().unwrap().to_string();
    assert!(e.contains(&m.train.files[0]) && e.contains("bytes"), "{e}");

    let mut bad = bytes.clone();
    bad[64] = 0xff; // token 0x??ff >= 257
    bad[65] = 0x7f;
    std::fs::write(&shard, &bad).unwrap();
    let e = Dataset::open(&out, &[1; 32]).err().unwrap().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");

    std::fs::write(&shard, b"GGUF and more").unwrap();
    let e = Dataset::open(&out, &[1; 32]).err().unwrap().to_string();
    assert!(e.contains("not a token shard"), "{e}");

    // Tokens beyond the vocabulary never reach a shard.
    let e = prepare(
        &docs,
        &|_| Ok(vec![999]),
        &info(1),
        &d.path().join("t"),
        &PrepareOptions::default(),
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("999"), "{e}");
}

/// A long document whose validation mark falls inside a multi-byte character (curly quotes,
/// no paragraph break before the mark) is cut at a character boundary, for every fraction;
/// head and tail together are the document.
#[test]
fn a_cut_inside_a_multibyte_character_moves_to_its_start() {
    let text = "“Whale”, he said. ".repeat(300) + "\n\nend";
    let docs = vec![
        slm_data::Document {
            source: "long".into(),
            text: text.clone(),
        },
        slm_data::Document {
            source: "short".into(),
            text: "a".into(),
        },
    ];
    for (i, fraction) in [0.05, 0.1, 0.13, 0.2, 0.37].into_iter().enumerate() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("shards");
        prepare(
            &docs,
            &encode,
            &info(7),
            &out,
            &PrepareOptions {
                valid_fraction: fraction,
                seed: i as u64,
                ..Default::default()
            },
            &mut |_| {},
        )
        .unwrap();
        let ds = Dataset::open(&out, &[7; 32]).unwrap();
        let (train, valid) = (docs_of(&ds.train, 256), docs_of(&ds.valid, 256));
        let head = train.iter().find(|t| t.starts_with('“')).unwrap();
        let tail = valid.iter().find(|t| t.ends_with("end")).unwrap();
        assert_eq!(format!("{head}{tail}"), text, "fraction {fraction}");
    }
}

/// Reading past a shard's end is None, not a panic or a read of other bytes.
#[test]
fn tokens_past_a_shards_end_are_none() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("shards");
    let docs = vec![slm_data::Document {
        source: "x".into(),
        text: "abc".into(),
    }];
    let opts = PrepareOptions {
        valid_fraction: 0.0,
        ..Default::default()
    };
    prepare(&docs, &encode, &info(7), &out, &opts, &mut |_| {}).unwrap();
    let ds = Dataset::open(&out, &[7; 32]).unwrap();
    let s = &ds.train[0];
    assert_eq!(s.len(), 4);
    assert_eq!(s.get(3), Some(256));
    assert_eq!(s.get(4), None);
    assert_eq!(s.get(usize::MAX), None);
    assert_eq!(s.slice(2, usize::MAX), vec![u32::from(b'c'), 256]);
}

/// A validation fraction outside [0, 1) is refused by value before anything is written
/// (it used to be clamped: 1.5 quietly held everything out).
#[test]
fn a_validation_fraction_outside_zero_to_one_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let docs = vec![slm_data::Document {
        source: "x".into(),
        text: "abc".into(),
    }];
    for bad in [1.0, 1.5, -0.1, f64::NAN] {
        let out = d.path().join("shards");
        let opts = PrepareOptions {
            valid_fraction: bad,
            ..Default::default()
        };
        let e = prepare(&docs, &encode, &info(7), &out, &opts, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("valid fraction {bad}")), "{e}");
        assert!(!out.exists(), "{bad}: nothing is written");
    }
}
