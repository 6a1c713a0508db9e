//! A throwaway PostgreSQL cluster for a test: Debian's `postgresql` package (tools/setup
//! installs it), `initdb` in a temporary directory, the server listening on a Unix socket in
//! that directory only (no TCP port to collide on), trust authentication for the `acpimon`
//! user. PostgreSQL refuses to run as root: as root the cluster belongs to the `postgres` user
//! the package creates, and its programs run through `runuser`. Stopped (immediate) and removed
//! when dropped. If it cannot start, the test fails saying why; nothing skips.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The server's binaries: `$ACPIMON_PG_BIN`, else the newest /usr/lib/postgresql/*/bin.
fn bindir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ACPIMON_PG_BIN") {
        return dir.into();
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("initdb").is_file())
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!("PostgreSQL's server is not installed (no /usr/lib/postgresql/*/bin/initdb): run tools/setup, which installs Debian's postgresql, or set ACPIMON_PG_BIN")
    })
}

/// The uid and gid of `user`, from /etc/passwd.
fn ids(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&user) && f.len() > 3).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Run the server's programs as this user (when the test runs as root).
    as_user: Option<&'static str>,
    /// The directory of the server's socket.
    pub socket_dir: PathBuf,
}

impl Postgres {
    /// initdb and start a cluster; panics with the server's words if it cannot.
    pub fn start() -> Postgres {
        let bin = bindir();
        let dir = tempfile::Builder::new().prefix("acpimon-pg").tempdir().unwrap();
        let as_user = if rustix::process::geteuid().is_root() {
            let (uid, gid) = ids("postgres").unwrap_or_else(|| {
                panic!("running as root, PostgreSQL needs another user: no 'postgres' user (Debian's postgresql package creates it; run tools/setup)")
            });
            rustix::fs::chown(
                dir.path(),
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )
            .unwrap();
            Some("postgres")
        } else {
            None
        };
        let pg = Postgres { socket_dir: dir.path().to_path_buf(), dir, bin, as_user };
        let data = pg.dir.path().join("data");
        pg.run(
            "initdb",
            &["-D", data.to_str().unwrap(), "-U", "acpimon", "-A", "trust", "-E", "UTF8", "--no-sync"],
        );
        let log = pg.dir.path().join("server.log");
        let opts = format!(
            "-k {} -c listen_addresses='' -c fsync=off -c max_connections=200",
            pg.socket_dir.display()
        );
        let started = pg
            .command("pg_ctl")
            .args([
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "-o",
                &opts,
                "start",
            ])
            .output()
            .expect("pg_ctl runs");
        assert!(
            started.status.success(),
            "PostgreSQL did not start: {}{}\nserver log:\n{}",
            String::from_utf8_lossy(&started.stdout),
            String::from_utf8_lossy(&started.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        pg
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match self.as_user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out =
            self.command(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The URL of database `name` on this cluster.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://acpimon@/{name}?host={}", self.socket_dir.display())
    }

    /// Creates database `name`; its URL.
    pub async fn database(&self, name: &str) -> String {
        let (client, conn) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await.unwrap_or_else(|e| {
                panic!("cannot connect to the test cluster at {}: {e}", self.socket_dir.display())
            });
        let task = tokio::spawn(conn);
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        drop(client);
        let _ = task.await;
        self.url(name)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ =
            self.command("pg_ctl").args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"]).output();
    }
}
