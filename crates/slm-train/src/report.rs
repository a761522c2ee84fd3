//! report.html in the run folder: loss curves, learning rate and throughput drawn from
//! metrics.jsonl as inline SVG (plotters), so it opens offline with no scripts.

use std::io::Write;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::run::{Result, TrainError};
use crate::samples::Sample;

#[derive(Default)]
struct Series {
    tokens: Vec<f64>,
    loss: Vec<f64>,
    lr: Vec<f64>,
    tps: Vec<f64>,
    valid: Vec<(f64, f64)>,
    accuracy: Vec<(f64, f64)>,
}

fn read_metrics(path: &Path) -> Series {
    let mut s = Series::default();
    let text = std::fs::read_to_string(path).unwrap_or_default();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(t), Some(l)) = (v["tokens"].as_f64(), v["loss"].as_f64()) else {
            continue;
        };
        s.tokens.push(t);
        s.loss.push(l);
        s.lr.push(v["lr"].as_f64().unwrap_or(0.0));
        s.tps.push(v["tokens_per_s"].as_f64().unwrap_or(0.0));
        if let Some(vl) = v["valid_loss"].as_f64() {
            s.valid.push((t, vl));
        }
        if let Some(a) = v["valid_accuracy"].as_f64() {
            s.accuracy.push((t, a));
        }
    }
    s
}

fn range(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = v.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        if x.is_finite() {
            (a.min(x), b.max(x))
        } else {
            (a, b)
        }
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-9);
    (lo - pad, hi + pad)
}

type Line<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

fn chart(title: &str, x_label: &str, lines: &[Line]) -> std::result::Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 320)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let xs = range(lines.iter().flat_map(|l| l.2.iter().map(|p| p.0)));
        let ys = range(lines.iter().flat_map(|l| l.2.iter().map(|p| p.1)));
        let mut c = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(xs.0..xs.1, ys.0..ys.1)
            .map_err(|e| e.to_string())?;
        c.configure_mesh()
            .x_desc(x_label)
            .draw()
            .map_err(|e| e.to_string())?;
        for (name, color, pts) in lines {
            let color = *color;
            c.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        if lines.len() > 1 {
            c.configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// The samples of each evaluation, newest first: the prompt in grey, the model's text after it.
fn samples_html(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let samples: Vec<Sample> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if samples.is_empty() {
        return String::new();
    }
    let mut html = String::from("<h2>samples</h2>");
    let mut last_step = None;
    for s in samples.iter().rev() {
        if last_step != Some(s.step) {
            html.push_str(&format!("<h3>update {} ({} tokens)</h3>", s.step, s.tokens));
            last_step = Some(s.step);
        }
        html.push_str(&format!(
            "<p class=\"sample\"><span class=\"prompt\">{}</span>{}</p>",
            escape(&s.prompt),
            escape(&s.text)
        ));
    }
    html
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A classifier's last validation (validation.json, written by the run): the confusion
/// matrix, and precision, recall and F1 per label (per tag, for a tagger: entity scores by
/// seqeval's rules come from `slm eval --task tag:`).
fn confusion_html(path: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return String::new();
    };
    let labels: Vec<String> = v["labels"]
        .as_array()
        .map(|a| a.iter().filter_map(|l| l.as_str().map(escape)).collect())
        .unwrap_or_default();
    let rows: Vec<Vec<u64>> = v["confusion"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    r.as_array()
                        .map(|r| r.iter().filter_map(|x| x.as_u64()).collect())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default();
    if labels.is_empty()
        || rows.len() != labels.len()
        || rows.iter().any(|r| r.len() != labels.len())
    {
        return String::new();
    }
    let mut html = String::from(
        "<h2>last validation</h2><p>rows: the true label, columns: the predicted one</p><table><tr><td></td>",
    );
    for l in &labels {
        html.push_str(&format!("<td><b>{l}</b></td>"));
    }
    html.push_str("<td>precision</td><td>recall</td><td>F1</td></tr>");
    for (i, (l, r)) in labels.iter().zip(&rows).enumerate() {
        html.push_str(&format!("<tr><td><b>{l}</b></td>"));
        for x in r {
            html.push_str(&format!("<td>{x}</td>"));
        }
        let tp = r[i] as f64;
        let predicted: f64 = rows.iter().map(|row| row[i] as f64).sum();
        let gold: f64 = r.iter().map(|&x| x as f64).sum();
        let (p, rc) = (tp / predicted.max(1.0), tp / gold.max(1.0));
        let f1 = if p + rc > 0.0 {
            2.0 * p * rc / (p + rc)
        } else {
            0.0
        };
        html.push_str(&format!(
            "<td>{p:.3}</td><td>{rc:.3}</td><td>{f1:.3}</td></tr>"
        ));
    }
    html.push_str("</table>");
    html
}

/// Writes `run_dir/report.html` from `run_dir/metrics.jsonl` and `run_dir/recipe.toml`.
pub fn write_report(run_dir: &Path) -> Result<PathBuf> {
    let s = read_metrics(&run_dir.join("metrics.jsonl"));
    let zip = |y: &[f64]| -> Vec<(f64, f64)> {
        s.tokens.iter().copied().zip(y.iter().copied()).collect()
    };
    let fail = |e: String| TrainError::Setup(format!("drawing report.html: {e}"));
    let loss = chart(
        "loss",
        "tokens",
        &[
            ("train", BLUE, zip(&s.loss)),
            ("valid", RED, s.valid.clone()),
        ],
    )
    .map_err(fail)?;
    let lr = chart("learning rate", "tokens", &[("lr", GREEN, zip(&s.lr))]).map_err(fail)?;
    let tps = chart(
        "throughput (tokens/s)",
        "tokens",
        &[("tokens/s", MAGENTA, zip(&s.tps))],
    )
    .map_err(fail)?;
    let accuracy = if s.accuracy.is_empty() {
        String::new()
    } else {
        chart(
            "validation accuracy",
            "tokens",
            &[("accuracy", RED, s.accuracy.clone())],
        )
        .map_err(fail)?
    };
    let confusion = confusion_html(&run_dir.join("validation.json"));
    let recipe = std::fs::read_to_string(run_dir.join("recipe.toml")).unwrap_or_default();
    let samples = samples_html(&run_dir.join("samples.jsonl"));
    let last = |v: &[f64]| {
        v.last()
            .map(|x| format!("{x:.4}"))
            .unwrap_or_else(|| "-".into())
    };
    let valid = match (s.valid.last(), s.accuracy.last()) {
        (Some((_, v)), Some((_, a))) => format!("{v:.4} (accuracy {a:.4})"),
        (Some((_, v)), None) => format!("{v:.4} (perplexity {:.2})", v.exp()),
        _ => "-".into(),
    };
    let html = format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>slm run {name}</title>
<style>body{{font-family:sans-serif;max-width:800px;margin:2em auto}}td{{padding:0 1em 0 0}}pre{{background:#f4f4f4;padding:1em}}.sample{{white-space:pre-wrap;border-left:3px solid #ccc;padding-left:.6em}}.prompt{{color:#888}}</style>
</head><body><h1>slm run {name}</h1>
<table><tr><td>updates</td><td>{steps}</td></tr><tr><td>tokens</td><td>{tokens}</td></tr>
<tr><td>train loss</td><td>{train}</td></tr><tr><td>valid loss</td><td>{valid}</td></tr></table>
{loss}{accuracy}{confusion}{lr}{tps}{samples}<h2>recipe</h2><pre>{recipe}</pre></body></html>
"#,
        name = escape(&run_dir.display().to_string()),
        steps = s.loss.len(),
        tokens = s.tokens.last().copied().unwrap_or(0.0),
        train = last(&s.loss),
        recipe = escape(&recipe),
    );
    let path = run_dir.join("report.html");
    slm_data::shard::write_atomic(&path, |f| f.write_all(html.as_bytes()))?;
    Ok(path)
}
