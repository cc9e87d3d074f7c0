//! The gRPC API stays compatible with the clients of released versions: the current
//! `proto/rootfork/v1/rootfork.proto` is compared with each baseline in `proto/compat/` (see its
//! README). A baseline's service, method (types and streaming), message, field (number, name,
//! type, label) or enum value that is gone or changed is a breaking change, unless a removed
//! field's number is reserved. The checker itself is tested on baselines broken on purpose.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use prost_types::{
    DescriptorProto, EnumDescriptorProto, FileDescriptorSet, ServiceDescriptorProto,
};

fn proto_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto")
}

/// Compiles `<root>/rootfork/v1/rootfork.proto`.
fn compile(root: &Path) -> FileDescriptorSet {
    protox::compile([root.join("rootfork/v1/rootfork.proto")], [root])
        .unwrap_or_else(|e| panic!("compiling the proto under {}: {e}", root.display()))
}

/// Every message and enum of `set`'s `rootfork.*` files, by full name (nested ones included).
struct Index<'a> {
    messages: HashMap<String, &'a DescriptorProto>,
    enums: HashMap<String, &'a EnumDescriptorProto>,
}

impl<'a> Index<'a> {
    fn of(set: &'a FileDescriptorSet) -> Index<'a> {
        let mut ix = Index {
            messages: HashMap::new(),
            enums: HashMap::new(),
        };
        for f in set
            .file
            .iter()
            .filter(|f| f.package().starts_with("rootfork."))
        {
            let scope = format!(".{}", f.package());
            for e in &f.enum_type {
                ix.enums.insert(format!("{scope}.{}", e.name()), e);
            }
            for m in &f.message_type {
                ix.add_message(&scope, m);
            }
        }
        ix
    }

    fn add_message(&mut self, scope: &str, m: &'a DescriptorProto) {
        let name = format!("{scope}.{}", m.name());
        for e in &m.enum_type {
            self.enums.insert(format!("{name}.{}", e.name()), e);
        }
        for n in &m.nested_type {
            self.add_message(&name, n);
        }
        self.messages.insert(name, m);
    }
}

/// Every service of `set`'s `rootfork.*` files, by full name.
fn services(set: &FileDescriptorSet) -> HashMap<String, &ServiceDescriptorProto> {
    set.file
        .iter()
        .filter(|f| f.package().starts_with("rootfork."))
        .flat_map(|f| {
            f.service
                .iter()
                .map(move |s| (format!("{}.{}", f.package(), s.name()), s))
        })
        .collect()
}

/// What `new` breaks of `old`'s clients, one line each; empty when compatible.
fn breaking_changes(old: &FileDescriptorSet, new: &FileDescriptorSet) -> Vec<String> {
    let mut broken = Vec::new();
    let new_services = services(new);
    for (name, s) in services(old) {
        let Some(n) = new_services.get(&name) else {
            broken.push(format!("service {name} removed"));
            continue;
        };
        for m in &s.method {
            let Some(nm) = n.method.iter().find(|x| x.name() == m.name()) else {
                broken.push(format!("method {name}.{} removed", m.name()));
                continue;
            };
            if (m.input_type(), m.output_type()) != (nm.input_type(), nm.output_type()) {
                broken.push(format!(
                    "method {name}.{}: {} -> {} became {} -> {}",
                    m.name(),
                    m.input_type(),
                    m.output_type(),
                    nm.input_type(),
                    nm.output_type()
                ));
            }
            if (m.client_streaming(), m.server_streaming())
                != (nm.client_streaming(), nm.server_streaming())
            {
                broken.push(format!("method {name}.{}: streaming changed", m.name()));
            }
        }
    }
    let (old_ix, new_ix) = (Index::of(old), Index::of(new));
    for (name, m) in &old_ix.messages {
        let Some(n) = new_ix.messages.get(name) else {
            broken.push(format!("message {name} removed"));
            continue;
        };
        for f in &m.field {
            match n.field.iter().find(|x| x.number() == f.number()) {
                None => {
                    let reserved = n
                        .reserved_range
                        .iter()
                        .any(|r| (r.start()..r.end()).contains(&f.number()));
                    if !reserved {
                        broken.push(format!(
                            "field {name}.{} = {} removed without reserving its number",
                            f.name(),
                            f.number()
                        ));
                    }
                }
                Some(nf) => {
                    let shape = |x: &prost_types::FieldDescriptorProto| {
                        (
                            x.name().to_owned(),
                            x.r#type(),
                            x.type_name().to_owned(),
                            x.label(),
                        )
                    };
                    if shape(f) != shape(nf) {
                        broken.push(format!(
                            "field {name}.{} = {}: {:?} became {:?}",
                            f.name(),
                            f.number(),
                            shape(f),
                            shape(nf)
                        ));
                    }
                }
            }
        }
    }
    for (name, e) in &old_ix.enums {
        let Some(n) = new_ix.enums.get(name) else {
            broken.push(format!("enum {name} removed"));
            continue;
        };
        for v in &e.value {
            if !n
                .value
                .iter()
                .any(|x| x.number() == v.number() && x.name() == v.name())
            {
                broken.push(format!(
                    "enum value {name}.{} = {} gone",
                    v.name(),
                    v.number()
                ));
            }
        }
    }
    broken.sort();
    broken
}

fn baselines() -> Vec<PathBuf> {
    let dir = proto_root().join("compat");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("rootfork/v1/rootfork.proto").is_file())
        .collect();
    found.sort();
    found
}

#[test]
fn the_api_serves_every_released_versions_clients() {
    let current = compile(&proto_root());
    let bases = baselines();
    assert!(!bases.is_empty(), "no baseline in proto/compat");
    for base in bases {
        let broken = breaking_changes(&compile(&base), &current);
        assert!(
            broken.is_empty(),
            "the API breaks the clients of {}:\n  {}\n(breaking changes go to a rootfork.v2 package)",
            base.display(),
            broken.join("\n  ")
        );
    }
}

/// A copy of the newest baseline with `edit` applied, compiled.
fn edited_baseline(edit: impl Fn(&str) -> String) -> (tempfile::TempDir, FileDescriptorSet) {
    let base = baselines().pop().unwrap();
    let text = std::fs::read_to_string(base.join("rootfork/v1/rootfork.proto")).unwrap();
    let edited = edit(&text);
    assert_ne!(edited, text, "the edit changed nothing");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rootfork/v1")).unwrap();
    std::fs::write(dir.path().join("rootfork/v1/rootfork.proto"), edited).unwrap();
    let set = compile(dir.path());
    (dir, set)
}

#[test]
fn the_checker_finds_breaking_changes() {
    let base = compile(&baselines().pop().unwrap());
    assert!(breaking_changes(&base, &base).is_empty());
    // A method dropped, a field renumbered, an enum value renamed.
    type Edit = fn(&str) -> String;
    let cases: [(&str, Edit, &str); 3] = [
        (
            "method",
            |t| t.replacen("rpc DeleteSandbox(", "rpc RemoveSandbox(", 1),
            "method rootfork.v1.Sandboxes.DeleteSandbox removed",
        ),
        (
            "field",
            |t| t.replacen("string template = 1;", "string template = 99;", 1),
            "template = 1 removed without reserving its number",
        ),
        (
            "enum",
            |t| t.replacen("SANDBOX_STATE_PAUSED", "SANDBOX_STATE_SUSPENDED", 1),
            "SANDBOX_STATE_PAUSED",
        ),
    ];
    for (what, edit, expect) in cases {
        let (_dir, new) = edited_baseline(edit);
        let broken = breaking_changes(&base, &new);
        assert!(
            broken.iter().any(|b| b.contains(expect)),
            "{what}: {expect:?} not found in {broken:?}"
        );
    }
    // Adding is compatible: a new method and a new field.
    let (_dir, grown) = edited_baseline(|t| {
        t.replacen(
            "string template = 1;",
            "string template = 1;\n  string added_later = 1000;",
            1,
        )
    });
    assert_eq!(breaking_changes(&base, &grown), Vec::<String>::new());
}
