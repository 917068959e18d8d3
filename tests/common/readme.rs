//! The README, for tests that hold it to what the code does (metrics, quick start, snippets
//! operators copy).

/// The whole README.
pub fn text() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("read README.md")
}

/// The section under the level-2 heading starting with `heading` (e.g. `"## Quick start"`),
/// up to the next level-2 heading.
pub fn section(heading: &str) -> String {
    let readme = text();
    let start = readme
        .find(&format!("\n{heading}"))
        .unwrap_or_else(|| panic!("README has no section {heading:?}"));
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    rest[..end].to_owned()
}
