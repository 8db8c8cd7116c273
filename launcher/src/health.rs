//! What rank 0 knows of the two things every job depends on besides itself: the database and the
//! job files under the database directory. Shared by the MPI loop, the store thread and the
//! transition threads.
//!
//! When the database cannot be written (disk full, read-only, I/O errors) or job files cannot be
//! created (disk full, quota, read-only, permission denied, the directory gone), starting more
//! jobs only makes more results to keep or more jobs to give back. So the launcher stops starting
//! jobs, says why once (stderr and log), and tries again after a backoff that doubles from
//! [`FIRST_BACKOFF`] to [`MAX_BACKOFF`]: the store thread retries its buffered results, and the
//! loop lets jobs start again to see whether their files can be written. A recovery is logged once.
//! None of this is the jobs' fault: they are never failed for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// First pause after a failure.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest pause between attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// Writing the database.
    Database,
    /// Creating jobs' working directories and output files.
    JobFiles,
}

impl Resource {
    fn index(self) -> usize {
        self as usize
    }
    fn describe(self) -> &'static str {
        match self {
            Resource::Database => "cannot write the database",
            Resource::JobFiles => "cannot write job files",
        }
    }
}

#[derive(Debug, Clone)]
struct Trouble {
    why: String,
    since: Instant,
    retry_at: Instant,
    backoff: Duration,
    failures: u64,
}

/// The shared state; cheap to check when all is well.
#[derive(Debug, Default)]
pub struct Health {
    any: AtomicBool,
    troubles: Mutex<[Option<Trouble>; 2]>,
    /// Whether a failure, and a recovery, of each resource was told on stderr already: a
    /// resource that comes and goes is told once, then only logged.
    told: Mutex<[(bool, bool); 2]>,
}

impl Health {
    /// All well.
    pub fn new() -> Health {
        Health::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [Option<Trouble>; 2]> {
        self.troubles.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An attempt failed: the first failure is announced (log and stderr), later ones push the
    /// next attempt further out.
    pub fn failed(&self, what: Resource, why: &str, now: Instant) {
        let mut t = self.lock();
        let slot = &mut t[what.index()];
        match slot {
            None => {
                let msg = format!(
                    "{}: {why}; no job starts until it works again (retrying with backoff)",
                    what.describe()
                );
                tracing::error!("{msg}");
                let mut told = self.told.lock().unwrap_or_else(|e| e.into_inner());
                if !told[what.index()].0 {
                    told[what.index()].0 = true;
                    eprintln!("balsam-mpi-launcher: {msg}");
                }
                *slot = Some(Trouble {
                    why: why.to_string(),
                    since: now,
                    retry_at: now + FIRST_BACKOFF,
                    backoff: FIRST_BACKOFF,
                    failures: 1,
                });
            }
            Some(tr) => {
                tr.failures += 1;
                tr.backoff = (tr.backoff * 2).min(MAX_BACKOFF);
                tr.retry_at = now + tr.backoff;
                if tr.why != why {
                    tracing::debug!("{}: {why}", what.describe());
                    tr.why = why.to_string();
                }
            }
        }
        self.any.store(true, Ordering::Release);
    }

    /// An attempt worked: a recovery is announced once.
    pub fn ok(&self, what: Resource) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let mut t = self.lock();
        if let Some(tr) = t[what.index()].take() {
            let msg = format!(
                "{} works again after {:.1} s and {} failed attempts",
                match what {
                    Resource::Database => "writing the database",
                    Resource::JobFiles => "writing job files",
                },
                tr.since.elapsed().as_secs_f64(),
                tr.failures
            );
            tracing::warn!("{msg}");
            let mut told = self.told.lock().unwrap_or_else(|e| e.into_inner());
            if !told[what.index()].1 {
                told[what.index()].1 = true;
                eprintln!("balsam-mpi-launcher: {msg}");
            }
        }
        if t.iter().all(Option::is_none) {
            self.any.store(false, Ordering::Release);
        }
    }

    /// Whether an attempt on `what` is due: no trouble, or its backoff has passed.
    pub fn attempt_due(&self, what: Resource, now: Instant) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return true;
        }
        self.lock()[what.index()]
            .as_ref()
            .is_none_or(|t| now >= t.retry_at)
    }

    /// Whether jobs may start: the database takes writes, and job files are fine or due for
    /// another try.
    pub fn may_start_jobs(&self, now: Instant) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return true;
        }
        let t = self.lock();
        t[Resource::Database.index()].is_none()
            && t[Resource::JobFiles.index()]
                .as_ref()
                .is_none_or(|t| now >= t.retry_at)
    }

    /// The current trouble with `what`, in words.
    pub fn trouble(&self, what: Resource) -> Option<String> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        self.lock()[what.index()]
            .as_ref()
            .map(|t| format!("{}: {}", what.describe(), t.why))
    }
}

/// Whether an I/O error comes from the file system the launcher writes to (full, over quota,
/// read-only, not permitted) rather than from the job's own inputs.
pub fn is_file_system_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC | libc::EDQUOT | libc::EROFS | libc::EACCES | libc::EPERM | libc::EIO)
    )
}

/// Whether a store error is the database being unwritable or unreachable (worth retrying later),
/// rather than something about one job.
pub fn is_database_trouble(e: &balsam_store::Error) -> bool {
    e.is_unavailable() || matches!(e, balsam_store::Error::Io { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trouble_pauses_starts_with_a_growing_backoff_until_it_works_again() {
        let h = Health::new();
        let t = Instant::now();
        assert!(h.may_start_jobs(t));
        h.failed(Resource::JobFiles, "No space left on device", t);
        assert!(!h.may_start_jobs(t));
        assert!(h.may_start_jobs(t + FIRST_BACKOFF));
        h.failed(Resource::JobFiles, "No space left on device", t);
        assert!(!h.may_start_jobs(t + FIRST_BACKOFF));
        assert!(h.may_start_jobs(t + FIRST_BACKOFF * 2));
        for _ in 0..20 {
            h.failed(Resource::JobFiles, "No space left on device", t);
        }
        assert!(h.may_start_jobs(t + MAX_BACKOFF));
        h.ok(Resource::JobFiles);
        assert!(h.may_start_jobs(t));
        assert!(h.trouble(Resource::JobFiles).is_none());
    }

    #[test]
    fn an_unwritable_database_stops_starts_until_a_write_works() {
        let h = Health::new();
        let t = Instant::now();
        h.failed(Resource::Database, "database or disk is full", t);
        assert!(!h.may_start_jobs(t + MAX_BACKOFF * 10));
        assert!(!h.attempt_due(Resource::Database, t));
        assert!(h.attempt_due(Resource::Database, t + FIRST_BACKOFF));
        assert!(h
            .trouble(Resource::Database)
            .unwrap()
            .contains("cannot write the database: database or disk is full"));
        h.ok(Resource::Database);
        assert!(h.may_start_jobs(t));
    }

    #[test]
    fn file_system_errors_are_told_from_the_jobs_own() {
        let e = |c| std::io::Error::from_raw_os_error(c);
        assert!(is_file_system_error(&e(libc::ENOSPC)));
        assert!(is_file_system_error(&e(libc::EROFS)));
        assert!(is_file_system_error(&e(libc::EDQUOT)));
        assert!(!is_file_system_error(&e(libc::ENOENT)));
        assert!(!is_database_trouble(&balsam_store::Error::UnknownJob(
            "#2".into()
        )));
    }
}
