//! The `rootfork` command: serves copy-on-write root disks for microVM sandboxes.

fn main() {
    println!("rootfork {}", env!("CARGO_PKG_VERSION"));
}
