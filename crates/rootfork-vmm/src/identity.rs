//! What a path *is*, not what it is called: the `(st_dev, st_ino, st_rdev, kind)` of a file.
//!
//! Two paths name the same disk when their identities match: block and character devices match
//! on `st_rdev` (two device nodes in different places — `/dev/nbd3` and a `mknod` copy inside a
//! jail — are the same disk), everything else on `st_dev` + `st_ino`.

use std::fmt;
use std::fs::Metadata;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// The kind of file an identity was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// A block device node (`/dev/nbdN`, `/dev/loopN`).
    Block,
    /// A character device node (`/dev/null`).
    Char,
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// Anything else (socket, fifo, anonymous inode...).
    Other,
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Block => "block device",
            FileKind::Char => "character device",
            FileKind::Regular => "regular file",
            FileKind::Directory => "directory",
            FileKind::Other => "special file",
        })
    }
}

/// The identity of a file as `stat(2)` (following symlinks) reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileIdentity {
    /// `st_dev`: the device holding the inode.
    pub dev: u64,
    /// `st_ino`: the inode number.
    pub ino: u64,
    /// `st_rdev`: the device a device node stands for (0 for other files).
    pub rdev: u64,
    /// What kind of file it is.
    pub kind: FileKind,
}

impl FileIdentity {
    /// Stats `path`, following symlinks.
    pub fn of(path: &Path) -> io::Result<Self> {
        std::fs::metadata(path).map(|m| Self::from_metadata(&m))
    }

    /// The identity recorded in already fetched metadata.
    pub fn from_metadata(meta: &Metadata) -> Self {
        let ft = meta.file_type();
        let kind = if ft.is_block_device() {
            FileKind::Block
        } else if ft.is_char_device() {
            FileKind::Char
        } else if ft.is_file() {
            FileKind::Regular
        } else if ft.is_dir() {
            FileKind::Directory
        } else {
            FileKind::Other
        };
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            rdev: meta.rdev(),
            kind,
        }
    }

    /// Whether this is a device node (block or character).
    pub fn is_device_node(&self) -> bool {
        matches!(self.kind, FileKind::Block | FileKind::Char)
    }

    /// Whether `other` refers to the same disk: the same device number for device nodes of the
    /// same kind, the same inode otherwise.
    pub fn same_disk(&self, other: &FileIdentity) -> bool {
        if self.is_device_node() || other.is_device_node() {
            self.kind == other.kind && self.rdev == other.rdev
        } else {
            self.same_inode(other)
        }
    }

    /// Whether `other` is the very same inode (`st_dev` and `st_ino` equal).
    pub fn same_inode(&self, other: &FileIdentity) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }
}

impl fmt::Display for FileIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_device_node() {
            write!(
                f,
                "{} {}:{}",
                self.kind,
                nix::sys::stat::major(self.rdev),
                nix::sys::stat::minor(self.rdev)
            )
        } else {
            write!(f, "{} dev {} ino {}", self.kind, self.dev, self.ino)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_null_is_a_char_device_matching_by_rdev() {
        let a = FileIdentity::of(Path::new("/dev/null")).unwrap();
        assert_eq!(a.kind, FileKind::Char);
        let b = FileIdentity::of(Path::new("/dev/zero")).unwrap();
        assert!(a.same_disk(&a));
        assert!(!a.same_disk(&b));
    }

    #[test]
    fn regular_files_match_by_inode_and_follow_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        let g = dir.path().join("g");
        std::fs::write(&f, b"x").unwrap();
        std::fs::write(&g, b"x").unwrap();
        std::os::unix::fs::symlink(&f, dir.path().join("l")).unwrap();
        let fi = FileIdentity::of(&f).unwrap();
        assert_eq!(fi.kind, FileKind::Regular);
        assert!(fi.same_disk(&FileIdentity::of(&dir.path().join("l")).unwrap()));
        assert!(!fi.same_disk(&FileIdentity::of(&g).unwrap()));
        assert!(!fi.same_disk(&FileIdentity::of(Path::new("/dev/null")).unwrap()));
    }
}
