//! The double's side channel: one JSON object per line describing every request it answered and
//! every file it opened, written to the `--report` file (or stdout). Tests read it to learn what
//! the "VMM" saw, without any non-spec API endpoint.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use parking_lot::Mutex;
use serde_json::Value;

/// Appends JSON lines to the report.
#[derive(Debug)]
pub struct Reporter {
    out: Mutex<Option<File>>,
}

impl Reporter {
    /// Reports to `path` (created or appended to), or to stdout if `None`.
    pub fn new(path: Option<&Path>) -> std::io::Result<Self> {
        let out = match path {
            Some(p) => Some(File::options().create(true).append(true).open(p)?),
            None => None,
        };
        Ok(Reporter {
            out: Mutex::new(out),
        })
    }

    /// Writes one event line. A failing report is a broken test setup, so it is printed to
    /// stderr rather than silently dropped.
    pub fn event(&self, event: Value) {
        let mut line = event.to_string();
        line.push('\n');
        let mut out = self.out.lock();
        let res = match out.as_mut() {
            Some(f) => f.write_all(line.as_bytes()).and_then(|_| f.flush()),
            None => {
                let mut so = std::io::stdout().lock();
                so.write_all(line.as_bytes()).and_then(|_| so.flush())
            }
        };
        if let Err(e) = res {
            eprintln!("rootfork-fc-double: cannot write the report: {e}");
        }
    }
}

/// Reads a report file back into events (for tests).
pub fn read_report(path: &Path) -> std::io::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(std::io::Error::other))
        .collect()
}
