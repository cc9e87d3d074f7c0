//! The direct provider: a plain writable file holding a full copy of the template.
//!
//! Used to build templates (boot a builder VM on a real file, then publish the file), not for
//! sandboxes: there is no overlay, so there is no diff to export. The copy runs in the background
//! (`start()` returns at once); the file is kept only after a successful `close()` — dropping the
//! provider, or closing it before the copy finished, removes the file so nothing half-built is
//! left behind.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rootfork_block::{TemplateFile, TemplatePath};
use rootfork_vmm::{DevicePath, ReadyDevice};
use tokio::task::JoinHandle;

use crate::copy::{copy_template, CopyMethod};
use crate::error::{ProviderError, Result};
use crate::pause::PausedDisk;
use crate::provider::{Provider, ProviderKind};
use crate::readiness::{Readiness, State};

/// A full, writable copy of a template.
#[derive(Debug)]
pub struct DirectProvider {
    template: TemplatePath,
    dest: PathBuf,
    readiness: Arc<Readiness<ReadyDevice>>,
    cancel: Arc<AtomicBool>,
    task: Option<JoinHandle<()>>,
    method: Arc<std::sync::Mutex<Option<CopyMethod>>>,
    /// The file at `dest` is ours (we created it) and must be removed unless kept.
    owns_dest: Arc<AtomicBool>,
    kept: bool,
}

impl DirectProvider {
    /// A provider that will copy `template` to `dest` (which must not exist yet).
    pub fn new(template: TemplatePath, dest: impl Into<PathBuf>) -> Self {
        DirectProvider {
            template,
            dest: dest.into(),
            readiness: Arc::new(Readiness::new()),
            cancel: Arc::new(AtomicBool::new(false)),
            task: None,
            method: Arc::default(),
            owns_dest: Arc::new(AtomicBool::new(false)),
            kept: false,
        }
    }

    /// The destination file.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// How the copy was made, once it is done.
    pub fn copy_method(&self) -> Option<CopyMethod> {
        *self.method.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn attach(
        template: &TemplatePath,
        dest: &Path,
        cancel: &AtomicBool,
        owns: &AtomicBool,
    ) -> Result<(ReadyDevice, CopyMethod)> {
        let src = TemplateFile::open(template)?;
        let dst = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(dest)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => ProviderError::Exists(dest.to_owned()),
                _ => ProviderError::io(format!("creating {}", dest.display()), e),
            })?;
        owns.store(true, Ordering::SeqCst);
        let method = copy_template(&src, &dst, cancel)?;
        dst.sync_all()
            .map_err(|e| ProviderError::io("syncing the copy", e))?;
        if cancel.load(Ordering::SeqCst) {
            return Err(ProviderError::Cancelled);
        }
        let ready = ReadyDevice::verify(DevicePath::new(dest))?;
        Ok((ready, method))
    }
}

impl Provider for DirectProvider {
    type Device = ReadyDevice;

    fn kind(&self) -> ProviderKind {
        ProviderKind::Direct
    }

    fn start(&mut self) -> Result<()> {
        self.readiness.begin()?;
        let (template, dest) = (self.template.clone(), self.dest.clone());
        let (readiness, cancel, method, owns) = (
            self.readiness.clone(),
            self.cancel.clone(),
            self.method.clone(),
            self.owns_dest.clone(),
        );
        self.task = Some(tokio::spawn(async move {
            let job = tokio::task::spawn_blocking(move || {
                let r = Self::attach(&template, &dest, &cancel, &owns);
                if r.is_err() && owns.swap(false, Ordering::SeqCst) {
                    let _ = std::fs::remove_file(&dest);
                }
                r
            });
            let state = match job.await {
                Ok(Ok((ready, m))) => {
                    *method.lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
                    State::Ready(ready)
                }
                Ok(Err(e)) => State::Failed(Arc::new(e)),
                Err(e) => State::Failed(Arc::new(ProviderError::Task(e.to_string()))),
            };
            if !matches!(readiness.current(), State::Closed) {
                readiness.set(state);
            }
        }));
        Ok(())
    }

    fn path<C>(
        &self,
        timeout: Duration,
        cancel: C,
    ) -> impl Future<Output = Result<ReadyDevice>> + Send
    where
        C: Future<Output = ()> + Send,
    {
        let readiness = self.readiness.clone();
        async move { readiness.wait(timeout, cancel).await }
    }

    async fn close(&mut self) -> Result<()> {
        let was = self.readiness.current();
        if matches!(was, State::Closed) {
            return Ok(());
        }
        let finished = matches!(was, State::Ready(_));
        if let Some(task) = self.task.take() {
            if !finished {
                // Stop a copy in progress without waiting for it (it may be stuck opening the
                // template); the copy thread sees the flag and removes its partial file.
                self.cancel.store(true, Ordering::SeqCst);
                task.abort();
            }
            let _ = task.await;
        }
        self.readiness.set(State::Closed);
        // The copy may have completed while we were cancelling it; keep it only if it was
        // ready when close() began.
        if finished {
            let f = File::open(&self.dest)
                .map_err(|e| ProviderError::io(format!("opening {}", self.dest.display()), e))?;
            f.sync_all()
                .map_err(|e| ProviderError::io("syncing the copy", e))?;
            self.kept = true;
        } else if self.owns_dest.swap(false, Ordering::SeqCst) {
            let _ = std::fs::remove_file(&self.dest);
        }
        Ok(())
    }

    fn export_diff(&mut self, _data_out: &Path) -> impl Future<Output = Result<PausedDisk>> + Send {
        std::future::ready(Err(ProviderError::Unsupported {
            op: "export_diff",
            kind: "direct",
        }))
    }
}

impl Drop for DirectProvider {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        // A copy still running sees the flag and stops; whoever holds the file's ownership
        // (this drop or the copy thread's error path) removes it, exactly once.
        self.cancel.store(true, Ordering::SeqCst);
        if self.owns_dest.swap(false, Ordering::SeqCst) {
            let _ = std::fs::remove_file(&self.dest);
        }
        self.readiness.set(State::Closed);
    }
}
