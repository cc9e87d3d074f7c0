//! The kernel's boot id: tells a restart after process death (same boot, the page cache and so
//! the live state copy survived) from one after a power loss or reboot (only what was synced did).

use crate::error::{BlockError, Result};

/// Where the kernel publishes the boot id (a random UUID chosen at every boot).
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// The current boot id as 16 bytes.
pub(crate) fn current() -> Result<[u8; 16]> {
    let text = std::fs::read_to_string(BOOT_ID_PATH)
        .map_err(|e| BlockError::io("reading the kernel's boot id", e))?;
    parse(&text).ok_or(BlockError::InvalidArgument(
        "the kernel's boot id is not a UUID",
    ))
}

/// Parses a UUID in its 36-character text form (hyphens anywhere are ignored).
fn parse(text: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = text.trim().bytes().filter(|b| *b != b'-').collect();
    if hex.len() != 32 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let digits = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(digits, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uuids_and_rejects_garbage() {
        let id = parse("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\n").unwrap();
        assert_eq!(id[0], 0x0f);
        assert_eq!(id[15], 0xf0);
        assert_eq!(parse(""), None);
        assert_eq!(parse("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f"), None);
        assert_eq!(parse("zz1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"), None);
        assert_eq!(parse("+f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"), None);
    }

    #[test]
    fn the_running_kernel_has_one() {
        let a = current().unwrap();
        assert_eq!(a, current().unwrap());
        assert_ne!(a, [0; 16]);
    }
}
