//! report.html from one or more results files: the models side by side in tables, a grouped
//! bar chart of each task's primary metric with standard-error bars, and, for several files
//! (checkpoints of one run, say), a line per task across them. Inline SVG: no scripts, opens
//! offline.

use plotters::prelude::*;

use crate::results::{Results, TaskResult};

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Task names in first-seen order across all files.
fn task_names(runs: &[(String, Results)]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (_, r) in runs {
        for t in &r.tasks {
            if !names.contains(&t.name) {
                names.push(t.name.clone());
            }
        }
    }
    names
}

/// (value, stderr) of task `name`'s primary metric in one results file.
fn primary(r: &Results, name: &str) -> Option<(f64, f64)> {
    let t = r.tasks.iter().find(|t| t.name == name)?;
    let m = t.metrics.get(&t.primary)?;
    Some((m.value, m.stderr))
}

/// Task `name` as the first file that has it describes it.
fn first_task<'a>(runs: &'a [(String, Results)], name: &str) -> Option<&'a TaskResult> {
    runs.iter()
        .flat_map(|(_, r)| r.tasks.iter())
        .find(|t| t.name == name)
}

fn is_accuracy(runs: &[(String, Results)], name: &str) -> bool {
    first_task(runs, name)
        .map(|t| t.kind != "perplexity")
        .unwrap_or(false)
}

/// Upper end of a y axis from 0 that holds `values` with a margin.
fn axis_top(values: impl Iterator<Item = f64>) -> f64 {
    let top = values.fold(0f64, f64::max) * 1.1;
    if top > 0.0 {
        top
    } else {
        1.0
    }
}

/// An x-axis label: the name at an integer position, nothing between.
fn index_label(labels: &[String], x: f64) -> String {
    let i = x.round();
    if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
        labels[i as usize].clone()
    } else {
        String::new()
    }
}

/// Grouped bars: one group per task, one bar per results file, with +-1 stderr whiskers.
fn bar_chart(runs: &[(String, Results)], tasks: &[String], title: &str) -> Result<String, String> {
    let mut svg = String::new();
    let groups = tasks.len() as f64;
    let width = 0.8 / runs.len() as f64;
    let top = axis_top(
        tasks
            .iter()
            .flat_map(|t| runs.iter().filter_map(move |(_, r)| primary(r, t)))
            .map(|(v, se)| v + se),
    );
    {
        let root = SVGBackend::with_string(&mut svg, (860, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let labels = tasks.to_vec();
        let mut c = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5..groups - 0.5, 0.0..top)
            .map_err(|e| e.to_string())?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(tasks.len().max(2))
            .x_label_formatter(&|x| index_label(&labels, *x))
            .draw()
            .map_err(|e| e.to_string())?;
        for (k, (label, r)) in runs.iter().enumerate() {
            let color = PALETTE[k % PALETTE.len()];
            let mut bars = Vec::new();
            let mut whiskers = Vec::new();
            for (g, t) in tasks.iter().enumerate() {
                let Some((v, se)) = primary(r, t) else {
                    continue;
                };
                let x0 = g as f64 - 0.4 + k as f64 * width;
                bars.push(Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.9, v)],
                    color.filled(),
                ));
                let xm = x0 + width * 0.45;
                whiskers.push(PathElement::new(vec![(xm, v - se), (xm, v + se)], BLACK));
            }
            c.draw_series(bars)
                .map_err(|e| e.to_string())?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
            c.draw_series(whiskers).map_err(|e| e.to_string())?;
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// One line per task: its primary metric across the results files in the order given.
fn line_chart(runs: &[(String, Results)], tasks: &[String]) -> Result<String, String> {
    let mut svg = String::new();
    let n = runs.len() as f64;
    let top = axis_top(
        tasks
            .iter()
            .flat_map(|t| runs.iter().filter_map(move |(_, r)| primary(r, t)))
            .map(|(v, _)| v),
    );
    {
        let root = SVGBackend::with_string(&mut svg, (860, 340)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let labels: Vec<String> = runs.iter().map(|(l, _)| l.clone()).collect();
        let mut c = ChartBuilder::on(&root)
            .caption("primary metric across results files", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.2..n - 0.8, 0.0..top)
            .map_err(|e| e.to_string())?;
        c.configure_mesh()
            .x_labels(runs.len().max(2))
            .x_label_formatter(&|x| index_label(&labels, *x))
            .draw()
            .map_err(|e| e.to_string())?;
        for (k, t) in tasks.iter().enumerate() {
            let color = PALETTE[k % PALETTE.len()];
            let pts: Vec<(f64, f64)> = runs
                .iter()
                .enumerate()
                .filter_map(|(i, (_, r))| primary(r, t).map(|(v, _)| (i as f64, v)))
                .collect();
            c.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(t.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            c.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| e.to_string())?;
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

fn cell(v: f64, se: f64, accuracy: bool) -> String {
    if accuracy {
        format!("{:.2} &plusmn; {:.2}", 100.0 * v, 100.0 * se)
    } else {
        format!("{v:.4} &plusmn; {se:.4}")
    }
}

/// The whole page. `runs` pairs a label (the file name) with its results.
pub fn render(runs: &[(String, Results)]) -> Result<String, String> {
    let tasks = task_names(runs);
    let mut html = String::from(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>slm evaluation</title>
<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}td,th{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:right}td:first-child,th:first-child{text-align:left}.note{color:#666}</style>
</head><body><h1>slm evaluation</h1>
"#,
    );
    // Models.
    html.push_str("<h2>models</h2><table><tr><th>results</th><th>model</th><th>format</th><th>weights</th><th>parameters</th><th>arithmetic</th><th>threads</th><th>slm</th><th>created</th></tr>");
    for (label, r) in runs {
        let arith: Vec<String> =
            r.tasks
                .iter()
                .map(|t| t.arithmetic.clone())
                .fold(Vec::new(), |mut v, a| {
                    if !v.contains(&a) {
                        v.push(a);
                    }
                    v
                });
        html.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}M</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(label),
            escape(&r.model.name),
            escape(&r.model.format),
            escape(&r.model.weights),
            r.model.parameters as f64 / 1e6,
            escape(&arith.join(", ")),
            r.threads,
            escape(&r.slm_version),
            escape(&r.created),
        ));
    }
    html.push_str("</table>");
    // Primary metrics side by side.
    html.push_str("<h2>primary metrics</h2><p class=\"note\">accuracies in percent, &plusmn; one standard error</p><table><tr><th>task</th><th>metric</th>");
    for (label, _) in runs {
        html.push_str(&format!("<th>{}</th>", escape(label)));
    }
    html.push_str("</tr>");
    for t in &tasks {
        let acc = is_accuracy(runs, t);
        let metric = first_task(runs, t)
            .map(|x| x.primary.clone())
            .unwrap_or_default();
        html.push_str(&format!(
            "<tr><td>{}</td><td>{}</td>",
            escape(t),
            escape(&metric)
        ));
        for (_, r) in runs {
            match primary(r, t) {
                Some((v, se)) => html.push_str(&format!("<td>{}</td>", cell(v, se, acc))),
                None => html.push_str("<td>-</td>"),
            }
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>");
    let acc_tasks: Vec<String> = tasks
        .iter()
        .filter(|t| is_accuracy(runs, t))
        .cloned()
        .collect();
    let ppl_tasks: Vec<String> = tasks
        .iter()
        .filter(|t| !is_accuracy(runs, t))
        .cloned()
        .collect();
    if !acc_tasks.is_empty() {
        html.push_str(&bar_chart(
            runs,
            &acc_tasks,
            "accuracy (primary metric, ±1 standard error)",
        )?);
    }
    if !ppl_tasks.is_empty() {
        html.push_str(&bar_chart(
            runs,
            &ppl_tasks,
            "perplexity (lower is better)",
        )?);
    }
    if runs.len() > 1 && !acc_tasks.is_empty() {
        html.push_str(&line_chart(runs, &acc_tasks)?);
    }
    // Every metric of every task.
    html.push_str("<h2>all metrics</h2>");
    for (label, r) in runs {
        html.push_str(&format!("<h3>{}</h3><table><tr><th>task</th><th>n</th><th>shots</th><th>metric</th><th>value</th><th>stderr</th><th>tokens</th><th>seconds</th></tr>", escape(label)));
        for t in &r.tasks {
            for (i, (name, m)) in t.metrics.iter().enumerate() {
                let first = i == 0;
                html.push_str(&format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.4}</td><td>{:.4}</td><td>{}</td><td>{}</td></tr>",
                    if first { escape(&t.name) } else { String::new() },
                    if first { t.n.to_string() } else { String::new() },
                    if first { t.shots.to_string() } else { String::new() },
                    escape(name),
                    m.value,
                    m.stderr,
                    if first { t.tokens.to_string() } else { String::new() },
                    if first { format!("{:.0}", t.seconds) } else { String::new() },
                ));
            }
        }
        html.push_str("</table>");
    }
    html.push_str("</body></html>\n");
    Ok(html)
}
