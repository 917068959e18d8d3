//! What monitoring teams read in the README's "Metrics and logs" section is what `/metrics`
//! serves: every metric family the daemon registers is in the README's table, and every
//! metric name the section mentions (table and alert expressions) is one it registers.

mod common;

use common::daemon::Mailwarden;
use std::collections::BTreeSet;

/// `mailwarden_*` names in `text`, counters without their `_total` (as `# TYPE` names them).
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("mailwarden_") {
        let tail = &rest[i..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = tail[..len].trim_end_matches('_');
        // Histogram series (`_bucket`, `_sum`, `_count`) belong to their family.
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(family.to_owned());
        rest = &tail[len..];
    }
    out
}

/// The metric families registered in the sources: the string literal after each
/// `registry.register(` in the metrics modules, prefixed as the registry does.
fn registered() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for file in ["src/telemetry/metrics.rs", "src/alerts/metrics.rs"] {
        let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("read a metrics module");
        for after in text.split("registry.register(").skip(1) {
            let literal = after
                .trim_start()
                .strip_prefix('"')
                .and_then(|r| r.split_once('"'))
                .map(|(name, _)| name)
                .unwrap_or_else(|| panic!("{file}: register( without a name literal"));
            out.insert(format!("mailwarden_{literal}"));
        }
    }
    out
}

#[test]
fn the_readme_documents_every_metric_and_no_other() {
    let section = common::readme::section("## Metrics and logs");
    let documented = names(&section);
    let registered = registered();
    assert!(registered.len() >= 20, "{registered:?}");
    let undocumented: Vec<_> = registered.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "registered but not in the README's metrics table: {undocumented:?}"
    );
    let unknown: Vec<_> = documented.difference(&registered).collect();
    assert!(
        unknown.is_empty(),
        "in the README's metrics section (table or alert expressions) but never registered: \
         {unknown:?}"
    );

    // And what a running daemon serves after some traffic is among them (nothing registered
    // elsewhere, e.g. by a store, escapes the check above).
    let mw = Mailwarden::start("");
    mw.cli_ok("org", &["add", "mpt", "--name", "Ministry of Posts"]);
    let served: BTreeSet<String> = mw
        .metrics()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert!(!served.is_empty());
    let stray: Vec<_> = served.difference(&registered).collect();
    assert!(
        stray.is_empty(),
        "served but not found registered: {stray:?}"
    );
}
