//! Parsing cost of large and hostile files: each input is about `bytes` long and goes through
//! `parse_documents` (YAML → strict JSON → typed, validated objects), as a file reload does.

use std::time::Instant;

use sluice_translator::parse::parse_documents;

use crate::stats::summary;

/// The inputs: (name, text).
fn inputs(bytes: usize) -> Vec<(&'static str, String)> {
    let dr = |i: usize| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: dr-{i}, namespace: bench}}\n\
             spec:\n  host: svc-{i}\n  subsets:\n  - name: v1\n    labels: {{version: v1}}\n  - name: v2\n    labels: {{version: v2}}\n---\n"
        )
    };
    let mut valid = String::new();
    let mut i = 0;
    while valid.len() < bytes {
        valid.push_str(&dr(i));
        i += 1;
    }
    let half = bytes / 2;
    let nested = format!("{}{}", "[".repeat(half), "]".repeat(half));
    let block_nested: String = (0..bytes / 64).map(|d| format!("{}k{d}:\n", " ".repeat(d % 60))).collect();
    let long_string =
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: x}}\ndata: {{k: \"{}\"}}\n", "a".repeat(bytes));
    let many_docs = "---\n".repeat(bytes / 4);
    // Aliases: each level refers to the one before ten times (a "billion laughs").
    let mut aliases = String::from("a0: &a0 [x]\n");
    for level in 1..40 {
        aliases.push_str(&format!("a{level}: &a{level} [{}]\n", vec![format!("*a{}", level - 1); 10].join(", ")));
    }
    let wide_flow = format!("[{}]", vec!["1"; bytes / 2].join(","));
    vec![
        ("valid DestinationRules", valid),
        ("nested flow collections", nested),
        ("nested block mappings", block_nested),
        ("one long string", long_string),
        ("empty documents", many_docs),
        ("alias expansion", aliases),
        ("one wide flow sequence", wide_flow),
    ]
}

/// Prints the table.
pub fn run(bytes: usize, runs: usize, only: Option<&str>) -> anyhow::Result<()> {
    println!("Parse: `parse_documents` on inputs of about {bytes} bytes, {runs} runs each; ms min / median / max.\n");
    println!("| input | bytes | objects | errors | parse ms | first error |");
    println!("|---|---|---|---|---|---|");
    for (name, text) in inputs(bytes).into_iter().filter(|(name, _)| only.is_none_or(|o| name.contains(o))) {
        let mut times = Vec::new();
        let mut last = (0, Vec::new());
        for _ in 0..runs {
            let t = Instant::now();
            let (objects, diagnostics) = parse_documents("bench.yaml", &text);
            times.push(t.elapsed().as_secs_f64() * 1e3);
            last = (objects.len(), diagnostics);
        }
        let (lo, mid, hi) = summary(&times);
        let first = last.1.first().map(|d| d.message.chars().take(70).collect::<String>()).unwrap_or_default();
        println!(
            "| {name} | {} | {} | {} | {lo:.1} / {mid:.1} / {hi:.1} | {} |",
            text.len(),
            last.0,
            last.1.len(),
            first.replace('|', "\\|")
        );
    }
    Ok(())
}
