//! `server-info`: how to reach a database directory's PostgreSQL server. Every host that sees
//! the directory (a login node, the compute nodes of every allocation) reads it to connect, as
//! it would open `balsamdb.sqlite3` on one host.
//!
//! The password never sits in `server-info` itself: a private server's generated password is in
//! `pgpass` beside it (libpq's `.pgpass` format, mode 0600, so `psql` can use it too); a site's
//! server takes its password from the URL given to `balsam init` (kept in `pgpass` likewise),
//! `PGPASSFILE`, or `~/.pgpass`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The file in a database directory that names its PostgreSQL server.
pub const SERVER_INFO_FILE: &str = "server-info";
/// The password file of a database directory's server (mode 0600).
pub const PASSWORD_FILE: &str = "pgpass";

/// How long connecting may take before a command gives up with a clear message.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(8);

/// Contents of `server-info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Always `postgres` (room for other servers).
    pub backend: String,
    /// Host name or address clients connect to.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Database user.
    pub user: String,
    /// Database name.
    pub dbname: String,
    /// The private server's data directory, relative to the database directory; '' when the
    /// site runs the server (`balsam init --db-url`).
    #[serde(default)]
    pub data_dir: String,
    /// The system user the private server runs as ('' for the caller): PostgreSQL refuses to
    /// run as root.
    #[serde(default)]
    pub os_user: String,
}

/// Server settings of every balsam connection (see [`ServerInfo::client_config`]).
pub const SERVER_SIDE_TIMEOUTS: &str = "-c idle_in_transaction_session_timeout=20s \
     -c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3 \
     -c tcp_user_timeout=20s";

impl ServerInfo {
    /// Reads `DIR/server-info`.
    pub fn load(db_dir: &Path) -> Result<ServerInfo> {
        let path = db_dir.join(SERVER_INFO_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        serde_json::from_str(&text).map_err(|e| Error::Settings {
            path,
            key: "(file)".into(),
            problem: format!("not a server-info file: {e}"),
        })
    }

    /// Writes `DIR/server-info` (atomically: readers on other hosts never see half a file).
    pub fn save(&self, db_dir: &Path) -> Result<()> {
        let path = db_dir.join(SERVER_INFO_FILE);
        let tmp = db_dir.join(format!(".{SERVER_INFO_FILE}.tmp"));
        let mut text = serde_json::to_string_pretty(self).expect("server info serializes");
        text.push('\n');
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
    }

    /// A site's server from a URL, `postgresql://USER[:PASSWORD]@HOST[:PORT]/NAME` (or any
    /// libpq connection string). Returns the password when the URL has one.
    pub fn from_url(url: &str) -> Result<(ServerInfo, Option<String>)> {
        let bad = |problem: String| Error::BadValue {
            field: "--db-url".into(),
            value: redact(url),
            expected: format!("postgresql://USER@HOST:PORT/NAME ({problem})"),
        };
        let c: postgres::Config = url.parse().map_err(|e| bad(format!("{e}")))?;
        let host = match c.get_hosts().first() {
            Some(postgres::config::Host::Tcp(h)) => h.clone(),
            Some(_) => {
                return Err(bad(
                    "a TCP host is needed: compute nodes connect over the network".into(),
                ))
            }
            None => return Err(bad("no host".into())),
        };
        let user = c
            .get_user()
            .ok_or_else(|| bad("no user".into()))?
            .to_string();
        let dbname = c.get_dbname().unwrap_or(&user).to_string();
        let password = c
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        Ok((
            ServerInfo {
                backend: "postgres".into(),
                host,
                port: c.get_ports().first().copied().unwrap_or(5432),
                user,
                dbname,
                data_dir: String::new(),
                os_user: String::new(),
            },
            password,
        ))
    }

    /// `host:port`, as messages name the server.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The password for this server: the database directory's `pgpass`, then `PGPASSFILE`,
    /// then `~/.pgpass`. None when no file has a matching line.
    pub fn password(&self, db_dir: &Path) -> Option<String> {
        let mut files = vec![db_dir.join(PASSWORD_FILE)];
        if let Some(f) = std::env::var_os("PGPASSFILE") {
            files.push(PathBuf::from(f));
        }
        if let Some(home) = std::env::var_os("HOME") {
            files.push(Path::new(&home).join(".pgpass"));
        }
        files.iter().find_map(|f| {
            let text = std::fs::read_to_string(f).ok()?;
            pgpass_lookup(&text, &self.host, self.port, &self.dbname, &self.user)
        })
    }

    /// The client configuration: bounded connect time, and TCP timeouts so a server that
    /// vanishes (a link down) is noticed in seconds, not minutes.
    ///
    /// The server side gets the same, for every connection (whoever runs the server): a client
    /// cut off in the middle of a transaction (a compute node's link down) would otherwise keep
    /// that transaction open on the server, with its locks on its session and its jobs, until
    /// TCP gave up minutes later; other launchers skip locked rows, so nobody could expire that
    /// session or take its jobs. A transaction that waits for its client for 20 s is ended, and
    /// a dead peer is noticed within about 25 s.
    pub fn client_config(&self, db_dir: &Path) -> postgres::Config {
        let mut c = postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name("balsam")
            .options(SERVER_SIDE_TIMEOUTS)
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_user_timeout(Duration::from_secs(20))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3);
        if let Some(p) = self.password(db_dir) {
            c.password(p);
        }
        c
    }
}

/// A URL with its password, if any, replaced by `***` (for messages and logs).
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(a), Some(b)) if b > a => {
            let userinfo = &url[a + 3..b];
            match userinfo.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..a + 3], &userinfo[..c], &url[b..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Writes a one-line `pgpass` file of mode 0600 (created with that mode: never readable by
/// others, not even for a moment).
pub fn write_password_file(path: &Path, info: &ServerInfo, password: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let esc = |s: &str| s.replace('\\', "\\\\").replace(':', "\\:");
    let line = format!(
        "{}:{}:{}:{}:{}\n",
        esc(&info.host),
        info.port,
        esc(&info.dbname),
        esc(&info.user),
        esc(password)
    );
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
    f.write_all(line.as_bytes())
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
}

/// The password of the first matching line of a `.pgpass` text (`host:port:db:user:password`,
/// `*` matches anything, `\` escapes `:` and `\`).
pub fn pgpass_lookup(text: &str, host: &str, port: u16, db: &str, user: &str) -> Option<String> {
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                }
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() != 5 {
            continue;
        }
        let port = port.to_string();
        let want = [host, port.as_str(), db, user];
        if fields[..4]
            .iter()
            .zip(want)
            .all(|(f, w)| f == "*" || f == w)
        {
            return Some(fields[4].clone());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgpass_lines_match_with_wildcards_and_escapes() {
        let text =
            "# comment\nother:5432:*:*:no\nlogin1:5433:balsam:balsam:s3cr\\:et\n*:*:*:u:any\n";
        assert_eq!(
            pgpass_lookup(text, "login1", 5433, "balsam", "balsam").as_deref(),
            Some("s3cr:et")
        );
        assert_eq!(
            pgpass_lookup(text, "x", 1, "d", "u").as_deref(),
            Some("any")
        );
        assert_eq!(pgpass_lookup(text, "x", 1, "d", "v"), None);
    }

    #[test]
    fn urls_name_the_server_and_keep_the_password_apart() {
        let (info, pw) =
            ServerInfo::from_url("postgresql://alice:s3cret@db.site.org:6543/campaign").unwrap();
        assert_eq!(
            (
                info.host.as_str(),
                info.port,
                info.user.as_str(),
                info.dbname.as_str()
            ),
            ("db.site.org", 6543, "alice", "campaign")
        );
        assert_eq!(pw.as_deref(), Some("s3cret"));
        let (info, pw) = ServerInfo::from_url("postgresql://bob@h/x").unwrap();
        assert_eq!((info.port, pw), (5432, None));
        let e = ServerInfo::from_url("postgresql://h/x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no user"), "{e}");
        assert_eq!(
            redact("postgresql://alice:s3cret@h:1/x"),
            "postgresql://alice:***@h:1/x"
        );
    }

    #[test]
    fn password_file_is_private_and_round_trips() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let info = ServerInfo {
            backend: "postgres".into(),
            host: "h".into(),
            port: 5433,
            user: "balsam".into(),
            dbname: "balsam".into(),
            data_dir: "balsamdb".into(),
            os_user: String::new(),
        };
        info.save(tmp.path()).unwrap();
        assert_eq!(ServerInfo::load(tmp.path()).unwrap(), info);
        write_password_file(&tmp.path().join(PASSWORD_FILE), &info, "p:w").unwrap();
        let mode = std::fs::metadata(tmp.path().join(PASSWORD_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(info.password(tmp.path()).as_deref(), Some("p:w"));
    }
}
