//! Named-entity scoring as seqeval computes it (its default, conlleval-compatible mode):
//! entities are read from tag sequences with seqeval's chunk rules, and a predicted entity
//! counts only when its type, start and end all match a gold one. Sequences are joined with an
//! `O` between them, as seqeval joins a list of sentences. (Training files' tags are checked
//! to be strict BIO when read: slm_data::tasks::check_bio.)

use std::collections::{BTreeMap, BTreeSet};

/// An entity: its type and the first and last positions it covers (inclusive).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Entity {
    pub kind: String,
    pub start: usize,
    pub end: usize,
}

/// A tag's prefix ("B", "I", "O", "E", "S", ...) and type, as seqeval splits it: the first
/// character, and what follows the first '-' after it ("_" when nothing does).
fn split(tag: &str) -> (&str, &str) {
    let prefix = tag.get(..1).unwrap_or("");
    let rest = tag.get(1..).unwrap_or("");
    let kind = rest.split_once('-').map_or(rest, |(_, k)| k);
    (prefix, if kind.is_empty() { "_" } else { kind })
}

fn end_of_chunk(prev: &str, tag: &str, prev_kind: &str, kind: &str) -> bool {
    matches!(
        (prev, tag),
        ("E", _) | ("S", _) | ("B", "B" | "S" | "O") | ("I", "B" | "S" | "O")
    ) || (prev != "O" && prev != "." && prev_kind != kind)
}

fn start_of_chunk(prev: &str, tag: &str, prev_kind: &str, kind: &str) -> bool {
    matches!(tag, "B" | "S")
        || matches!((prev, tag), ("E" | "S" | "O", "E" | "I"))
        || (tag != "O" && tag != "." && prev_kind != kind)
}

/// The entities of one or more tag sequences (positions count through all of them, with one
/// `O` between consecutive sequences), in seqeval's `get_entities` order.
pub fn entities<S: AsRef<str>>(seqs: &[Vec<S>]) -> Vec<Entity> {
    let mut tags: Vec<&str> = Vec::new();
    for s in seqs {
        tags.extend(s.iter().map(AsRef::as_ref));
        tags.push("O");
    }
    let (mut prev, mut prev_kind, mut begin) = ("O", "", 0);
    let mut out = Vec::new();
    for (i, tag) in tags.iter().copied().chain(std::iter::once("O")).enumerate() {
        let (p, kind) = split(tag);
        if end_of_chunk(prev, p, prev_kind, kind) {
            out.push(Entity {
                kind: prev_kind.to_string(),
                start: begin,
                end: i - 1,
            });
        }
        if start_of_chunk(prev, p, prev_kind, kind) {
            begin = i;
        }
        prev = p;
        prev_kind = kind;
    }
    out
}

/// Precision, recall and F1 of one entity type or of all (micro), with the gold count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prf {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

impl Prf {
    /// From counts; 0 where a ratio has nothing to divide (seqeval's zero_division=0).
    fn of(correct: usize, predicted: usize, gold: usize) -> Prf {
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let (p, r) = (ratio(correct, predicted), ratio(correct, gold));
        let f1 = if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        };
        Prf {
            precision: p,
            recall: r,
            f1,
            support: gold,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EntityScores {
    pub micro: Prf,
    /// Every type that occurs in the gold or the predicted tags.
    pub per_type: BTreeMap<String, Prf>,
}

/// Entity precision, recall and F1 of `pred` against `gold` (one tag sequence per sentence),
/// micro-averaged and per type.
pub fn score<S: AsRef<str>>(gold: &[Vec<S>], pred: &[Vec<S>]) -> EntityScores {
    let g: BTreeSet<Entity> = entities(gold).into_iter().collect();
    let p: BTreeSet<Entity> = entities(pred).into_iter().collect();
    let kinds: BTreeSet<&str> = g.iter().chain(&p).map(|e| e.kind.as_str()).collect();
    let count = |set: &BTreeSet<Entity>, k: &str| set.iter().filter(|e| e.kind == k).count();
    let per_type = kinds
        .into_iter()
        .map(|k| {
            let correct = g.intersection(&p).filter(|e| e.kind == k).count();
            (k.to_string(), Prf::of(correct, count(&p, k), count(&g, k)))
        })
        .collect();
    EntityScores {
        micro: Prf::of(g.intersection(&p).count(), p.len(), g.len()),
        per_type,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn entities_follow_seqeval_chunk_rules() {
        // seqeval: get_entities(['O','I-PER','I-PER','B-LOC','I-PER','O','B-X'])
        //   == [('PER', 1, 2), ('LOC', 3, 3), ('PER', 4, 4), ('X', 6, 6)]
        let got = entities(&[seq("O I-PER I-PER B-LOC I-PER O B-X")]);
        let want: Vec<(&str, usize, usize)> =
            vec![("PER", 1, 2), ("LOC", 3, 3), ("PER", 4, 4), ("X", 6, 6)];
        let got: Vec<(&str, usize, usize)> = got
            .iter()
            .map(|e| (e.kind.as_str(), e.start, e.end))
            .collect();
        assert_eq!(got, want);
        // Two sentences: positions run on through the separating O.
        let two = entities(&[seq("B-PER"), seq("B-LOC I-LOC")]);
        assert_eq!((two[1].start, two[1].end), (2, 3));
    }

    #[test]
    fn scores_count_exact_matches_only() {
        let gold = vec![seq("B-PER I-PER O B-LOC"), seq("B-ORG O")];
        let pred = vec![seq("B-PER O O B-LOC"), seq("B-ORG O")];
        let s = score(&gold, &pred);
        // PER's span differs; LOC and ORG match: 2 correct of 3 predicted and 3 gold.
        assert!((s.micro.precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.micro.f1 - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(s.per_type["PER"].f1, 0.0);
        assert_eq!(s.per_type["LOC"].f1, 1.0);
        assert_eq!(s.per_type["ORG"].support, 1);
        let none = score(&[seq("O O")], &[seq("O O")]);
        assert_eq!(none.micro.f1, 0.0);
        assert!(none.per_type.is_empty());
    }
}
