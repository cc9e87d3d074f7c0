//! The template never changes: heavy writes through overlays leave its bytes (sha256) and mtime
//! as they were, and the only descriptors this process holds on it are read-only.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use common::*;
use nix::fcntl::OFlag;
use rand::{Rng, SeedableRng};
use rootfork_block::{BlockDevice, Overlay, OverlayOptions, TemplateFile, TemplatePath};
use sha2::{Digest, Sha256};

fn sha256(path: &Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

/// The access mode of every descriptor of this process open on `path`, from /proc/self/fdinfo.
fn access_modes(path: &Path) -> Vec<i32> {
    let want = path.canonicalize().unwrap();
    let mut modes = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let entry = entry.unwrap();
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target != want {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            entry.file_name().to_string_lossy()
        ))
        .unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|v| i32::from_str_radix(v.trim(), 8).unwrap())
            .unwrap();
        modes.push(flags & libc::O_ACCMODE);
    }
    modes
}

#[test]
fn template_is_unchanged_by_heavy_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("template.img");
    let bytes = template_bytes(8 << 20, 42);
    std::fs::write(&path, &bytes).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
    let before = sha256(&path);
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();

    let template = Arc::new(TemplateFile::open(&TemplatePath::new(&path)).unwrap());
    assert_eq!(
        template.open_flags().unwrap() & OFlag::O_ACCMODE,
        OFlag::O_RDONLY
    );

    // Two sandboxes on one template, two writer threads each.
    let overlays: Vec<Arc<Overlay>> = (0..2)
        .map(|i| {
            let cache = dir.path().join(format!("cache{i}"));
            Arc::new(Overlay::create(template.clone(), &cache, OverlayOptions::default()).unwrap())
        })
        .collect();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let ov = overlays[t % 2].clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
                let size = ov.size();
                let mut buf = vec![0u8; 300_000];
                for _ in 0..800 {
                    let off = rng.gen_range(0..size);
                    let len = rng.gen_range(0..=(size - off).min(buf.len() as u64)) as usize;
                    match rng.gen_range(0..4) {
                        0 | 1 => {
                            fill_pattern(&mut buf[..len], rng.gen());
                            ov.write_at(&buf[..len], off).unwrap();
                        }
                        2 => ov.write_zeroes(off, len as u64, rng.gen()).unwrap(),
                        _ => ov.trim(off, len as u64).unwrap(),
                    }
                }
                ov.flush().unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }

    // Each overlay reads differently from the template and from the other.
    let a = read_all(overlays[0].as_ref());
    let b = read_all(overlays[1].as_ref());
    assert_ne!(a, bytes);
    assert_ne!(a, b);

    // Every descriptor on the template, while the overlays are alive, is read-only.
    let modes = access_modes(&path);
    assert!(
        !modes.is_empty(),
        "the template fd was not found in /proc/self/fd"
    );
    assert!(
        modes.iter().all(|m| *m == libc::O_RDONLY),
        "template open with access modes {modes:?}"
    );

    drop(overlays);
    drop(template);
    assert_eq!(sha256(&path), before, "template contents changed");
    assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o444
    );
}

#[test]
fn fdinfo_check_sees_a_writable_descriptor() {
    // The check above must be able to fail: a read-write descriptor is reported as such.
    let f = tempfile::NamedTempFile::new().unwrap();
    let _rw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(f.path())
        .unwrap();
    assert!(access_modes(f.path()).contains(&libc::O_RDWR));
}
