//! The packaged default configuration (`dist/config.toml`, installed as
//! `/etc/rootfork/config.toml`) cannot rot: it loads with the daemon's own config loader as
//! shipped, every commented-out example loads too once uncommented (so no key is misspelt or
//! out of range — unknown keys are errors), and it mentions every file key docs/daemon.md lists.

use std::path::{Path, PathBuf};

use rootfork::config::{Config, FileConfig, Overrides};

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn packaged() -> (PathBuf, String) {
    let path = repo_file("dist/config.toml");
    let text = std::fs::read_to_string(&path).expect("dist/config.toml");
    (path, text)
}

/// The file with every `# key = value` example line uncommented.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if looks_like_assignment(rest) => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn looks_like_assignment(s: &str) -> bool {
    match s.split_once(" = ") {
        Some((key, _)) => {
            !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        }
        None => false,
    }
}

#[test]
fn shipped_config_loads_with_the_daemons_loader() {
    let (path, text) = packaged();
    let file = FileConfig::parse(&path, &text).expect("parses");
    let config = Config::resolve(file, Overrides::default()).expect("resolves");
    assert_eq!(config.state_dir, Path::new("/var/lib/rootfork"));
    assert_eq!(config.api_socket, Path::new("/var/lib/rootfork/api.sock"));
    assert_eq!(config.nbd_lock_dir, Path::new("/run/rootfork/nbd"));
    assert!(!config.demo_template);
    assert!(!config.delete_on_exit);
    assert!(config.api_tcp.is_none(), "TCP must stay off by default");
}

#[test]
fn every_commented_example_loads_too() {
    let (path, text) = packaged();
    let all = uncommented(&text);
    assert!(
        all.lines().count() == text.lines().count() && all != text,
        "no example lines found"
    );
    let file = FileConfig::parse(&path, &all).unwrap_or_else(|e| panic!("{e}\n{all}"));
    Config::resolve(file, Overrides::default()).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn uncommenting_finds_only_assignments() {
    assert_eq!(uncommented("# listen = \"off\""), "listen = \"off\"");
    assert_eq!(uncommented("# The state = here"), "# The state = here");
    assert_eq!(
        uncommented("# Delete every sandbox"),
        "# Delete every sandbox"
    );
}

/// The file keys of docs/daemon.md's configuration table (`api.socket`, `state_dir`, …).
fn documented_keys() -> Vec<String> {
    let doc = std::fs::read_to_string(repo_file("docs/daemon.md")).expect("docs/daemon.md");
    doc.lines()
        .skip_while(|l| !l.starts_with("| file key |"))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once("` |").map(|(k, _)| k))
        .filter(|k| {
            k.chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.')
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_documented_key_is_in_the_shipped_file() {
    let (_, text) = packaged();
    let table: toml::Table = uncommented(&text).parse().expect("valid TOML");
    let keys = documented_keys();
    assert!(keys.len() >= 20, "the docs table was not found: {keys:?}");
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| {
            let mut at = &table;
            let mut parts = k.split('.').peekable();
            while let Some(p) = parts.next() {
                match (at.get(p), parts.peek()) {
                    (Some(toml::Value::Table(t)), Some(_)) => at = t,
                    (Some(_), None) => return false,
                    _ => return true,
                }
            }
            true
        })
        .collect();
    assert!(
        missing.is_empty(),
        "dist/config.toml does not mention {missing:?}"
    );
}
