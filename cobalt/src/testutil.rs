//! Helpers for tests that drive the adapters through stand-in scheduler programs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Writes an executable `/bin/sh` script named `name` into `dir`.
pub(crate) fn fake_program(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A job script and a request to submit it.
pub(crate) fn request(dir: &Path) -> crate::SubmitRequest {
    let script = dir.join("qlaunch1.sh");
    std::fs::write(&script, "#!/bin/bash\necho hi\n").unwrap();
    crate::SubmitRequest {
        script,
        cwd: dir.to_path_buf(),
        job_name: "qlaunch1".into(),
        project: Some("datascience".into()),
        queue: "debug".into(),
        nodes: 2,
        wall_minutes: 30,
        sched_flags: vec!["--flag".into(), "a b".into()],
    }
}
