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
    /// When this launcher's lease on its jobs was last known held (see [`Health::lease_held`]).
    lease_held: Mutex<Option<Instant>>,
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

    /// The session's lease was known held at `at`: a heartbeat that started then was written,
    /// or it failed in a way no other launcher could have written either (the database file
    /// itself cannot be written), so nobody can have taken the jobs over.
    pub fn lease_held(&self, at: Instant) {
        let mut l = self.lease_held.lock().unwrap_or_else(|e| e.into_inner());
        if l.is_none_or(|t| at > t) {
            *l = Some(at);
        }
    }

    /// When the lease was last known held (None before the first heartbeat).
    pub fn lease_held_at(&self) -> Option<Instant> {
        *self.lease_held.lock().unwrap_or_else(|e| e.into_inner())
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

/// How long a launcher may go without knowing its lease held before it must stop its jobs.
///
/// Other launchers take a session's jobs over once it has been silent for `lease_expiry`; by
/// then every process of those jobs must be dead, or two copies of a job run at once. Stopping
/// takes up to `kill_grace` (SIGTERM, then SIGKILL), and heartbeats are a quarter of the expiry
/// apart at most, so the launcher stops its jobs after three quarters of the expiry less the kill
/// grace: 134 s with the default LEASE_EXPIRY_SECONDS of 180. Never less than two heartbeat
/// periods, so that one slow heartbeat alone never stops a launcher.
pub fn fence_after(lease_expiry: Duration, kill_grace: Duration) -> Duration {
    let floor = crate::store_thread::heartbeat_period(lease_expiry) * 2;
    lease_expiry
        .mul_f64(0.75)
        .saturating_sub(kill_grace)
        .max(floor)
}

/// Whether a launcher whose lease was last known held `since` ago must stop its jobs now.
pub fn must_fence(since: Duration, lease_expiry: Duration, kill_grace: Duration) -> bool {
    since >= fence_after(lease_expiry, kill_grace)
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
    fn a_launcher_stops_its_jobs_before_others_may_take_them() {
        let s = Duration::from_secs;
        let grace = s(1);
        // Default expiry: heartbeats every 10 s, stopped after 134 s, well before 180 s.
        assert_eq!(fence_after(s(180), grace), s(134));
        assert!(!must_fence(s(30), s(180), grace));
        assert!(must_fence(s(134), s(180), grace));
        // The shortest expiry allowed (5 s): the jobs are dead 1.25 s before the expiry.
        let f = fence_after(s(5), grace);
        assert_eq!(f, Duration::from_millis(2750));
        assert!(f + grace < s(5));
        // A kill grace as long as the expiry: never within two heartbeats.
        assert_eq!(fence_after(s(8), s(8)), s(4));
    }

    #[test]
    fn the_lease_is_held_as_of_the_latest_heartbeat_only() {
        let h = Health::new();
        assert!(h.lease_held_at().is_none());
        let t = Instant::now();
        h.lease_held(t + Duration::from_secs(2));
        // A heartbeat that started earlier but ended later does not move it back.
        h.lease_held(t);
        assert_eq!(h.lease_held_at(), Some(t + Duration::from_secs(2)));
    }

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
