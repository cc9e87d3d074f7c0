//! The state directory at start: its lock (one daemon per directory), removing what a previous
//! run left in the per-run directories (except the files of VMs that outlived it, which the next
//! start adopts), and the TCP bearer token file.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{io, StartError};

/// Empties `dir` but for the files in `keep`; returns how many entries were removed.
pub(super) fn clean_dir(dir: &Path, keep: &BTreeSet<PathBuf>) -> Result<usize, StartError> {
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let mut n = 0;
    for ent in std::fs::read_dir(dir)
        .map_err(io(format!("reading {}", dir.display())))?
        .flatten()
    {
        let p = ent.path();
        if keep.contains(&p) {
            continue;
        }
        if p.is_dir() && keep.iter().any(|k| k.starts_with(&p)) {
            // A directory holding something kept (`vm/fc/`, a Firecracker VM's run directory
            // in it): cleaned inside.
            n += clean_dir(&p, keep)?;
            continue;
        }
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        match r {
            Ok(()) => n += 1,
            Err(e) => tracing::warn!(path = %p.display(), "cannot remove a leftover: {e}"),
        }
    }
    Ok(n)
}

pub(super) fn lock_state(state: &Path) -> Result<nix::fcntl::Flock<File>, StartError> {
    let path = state.join("daemon.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io(format!("opening {}", path.display())))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(locked) => Ok(locked),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(StartError::Locked(state.to_owned())),
        Err((_, e)) => Err(StartError::Io {
            context: format!("locking {}", path.display()),
            source: e.into(),
        }),
    }
}

pub(super) fn read_or_make_token(path: &Path, generated: bool) -> Result<String, StartError> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => {
            if !generated {
                return Err(StartError::Io {
                    context: format!("token file {} is empty", path.display()),
                    source: std::io::ErrorKind::InvalidData.into(),
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && generated => {}
        Err(e) => return Err(io(format!("reading token file {}", path.display()))(e)),
    }
    let mut b = [0u8; 32];
    {
        use std::io::Read;
        File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .map_err(io("reading /dev/urandom"))?;
    }
    let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{token}\n").as_bytes()))
        .map_err(io(format!("writing token file {}", path.display())))?;
    tracing::info!(token_file = %path.display(), "generated a bearer token for the TCP API");
    Ok(token)
}

/// The state directory format this daemon writes:
/// - 1: templates, sandbox records, paused diffs;
/// - 2: 1, plus running sandboxes' overlays kept across a restart (the cache file and its block
///   state, named by the record's `served`), which a format-1 daemon would neither adopt nor
///   keep (it removes the block state as an orphan). A format-1 directory needs no conversion;
///   marking it 2 is the migration, and it makes a format-1 daemon (a downgrade) refuse it.
/// - 3: 2, plus forks: a fork's record names its parent's paused diff, a file several records
///   share and that goes with its last user (`shared.rs`); a format-2 daemon would remove it
///   with whichever of them it deleted first. No conversion; the mark makes a downgrade refuse.
/// - 4: the build store (`store/`): templates are base builds named by their records (no
///   `templates/NAME.img`), a paused sandbox's disk is a layer named by its record's `layer`
///   (no `paused/*.diff`). Migrated at start, by content (so a start interrupted midway goes on
///   where it stopped): the template store imports each image as a build, then every record's
///   diff becomes a layer (`migrate.rs`); a format-3 daemon would find no template image.
pub const FORMAT_VERSION: u32 = 4;

/// Refuses a state directory of a newer format; marks an older or unmarked one as this format
/// (after migrating it, which no format before this one needs beyond the mark).
pub(super) fn check_format(state: &Path) -> Result<(), StartError> {
    let path = state.join("format");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let v: u32 = text
                .trim()
                .strip_prefix("rootfork-state ")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| StartError::Io {
                    context: format!("{} does not name a format", path.display()),
                    source: std::io::ErrorKind::InvalidData.into(),
                })?;
            if v > FORMAT_VERSION {
                return Err(StartError::NewerFormat {
                    dir: state.to_owned(),
                    found: v,
                    supported: FORMAT_VERSION,
                });
            }
            if v < FORMAT_VERSION {
                mark_format(state, &path)?;
                tracing::info!(dir = %state.display(), from = v, to = FORMAT_VERSION, "migrated the state directory's format");
            }
            Ok(())
        }
        // A new directory, or one of a daemon from before the format was versioned (it had
        // templates only; nothing to migrate).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => mark_format(state, &path),
        Err(e) => Err(io(format!("reading {}", path.display()))(e)),
    }
}

/// Writes `path` naming [`FORMAT_VERSION`], atomically (temp file, fsync, rename, fsync of the
/// directory).
fn mark_format(state: &Path, path: &Path) -> Result<(), StartError> {
    let tmp = state.join(".format.tmp");
    std::fs::write(&tmp, format!("rootfork-state {FORMAT_VERSION}\n"))
        .and_then(|()| File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| File::open(state)?.sync_all())
        .map_err(io(format!("writing {}", path.display())))
}
