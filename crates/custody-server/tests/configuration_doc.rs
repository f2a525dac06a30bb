//! docs/CONFIGURATION.md lists exactly the settings the server reads, with their variables and
//! defaults.

use custody_server::config::SETTINGS;

#[test]
fn the_configuration_doc_matches_the_code() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/CONFIGURATION.md")).unwrap();
    let rows: Vec<Vec<String>> = doc
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells = l.trim_matches('|').split(" | ").map(str::trim);
            // Code cells (name, variable, default) are in backticks; the description is prose.
            cells.enumerate().map(|(i, c)| if i < 3 { c.trim_matches('`') } else { c }.to_string()).collect()
        })
        .collect();
    for s in SETTINGS {
        let row = rows.iter().find(|r| r[0] == s.name).unwrap_or_else(|| panic!("{} is not documented", s.name));
        assert_eq!(row[1], s.env, "{}: environment variable", s.name);
        assert_eq!(row[2], s.default, "{}: default", s.name);
        assert_eq!(row[3], s.doc, "{}: description", s.name);
        assert_eq!(
            s.env,
            format!("CUSTODY_{}", s.name.replace('.', "_").to_uppercase()),
            "variable names follow the setting names"
        );
    }
    for r in &rows {
        assert!(SETTINGS.iter().any(|s| s.name == r[0]), "{} is documented but not a setting", r[0]);
    }
    for s in SETTINGS.iter().filter(|s| s.name.contains("danger")) {
        assert!(s.name.starts_with("danger_"), "{}: security-weakening settings are named danger_*", s.name);
    }
}
