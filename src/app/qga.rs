//! The QEMU guest agent, where the image has one: `guest-ping` for liveness and
//! `guest-get-osinfo` for bundles, with `qapi`'s QGA command types over the agent's
//! virtio-serial socket. One connection per call: QEMU serves one client per socket, and the
//! agent keeps no session.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Longest reply line read from the agent.
const MAX_REPLY: usize = 1 << 20;

/// A connected, synchronised agent.
struct Agent {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Agent {
    /// Connects and flushes whatever an earlier client left: `guest-sync-delimited` makes the
    /// agent send 0xFF before its reply, so everything up to that byte is stale.
    async fn connect(path: &Path) -> Result<Agent, String> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| format!("cannot connect to the guest agent's socket {}: {e}", path.display()))?;
        let (read, writer) = stream.into_split();
        let mut agent = Agent { reader: BufReader::new(read), writer };
        let id = i64::from(rand::random::<u32>());
        agent.send(qapi::qga::guest_sync_delimited { id }).await?;
        let mut skipped = Vec::new();
        agent.reader.read_until(0xff, &mut skipped).await.map_err(|e| format!("guest agent: {e}"))?;
        loop {
            let reply = agent.reply().await?;
            if reply["return"].as_i64() == Some(id) {
                return Ok(agent);
            }
        }
    }

    async fn send<C: qapi::Command>(&mut self, cmd: C) -> Result<(), String> {
        let mut line = json!({ "execute": C::NAME, "arguments": cmd }).to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await.map_err(|e| format!("guest agent: {e}"))
    }

    async fn reply(&mut self) -> Result<Value, String> {
        let mut buf = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_REPLY as u64)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(|e| format!("guest agent: {e}"))?;
        if n == 0 {
            return Err("the guest agent's socket closed".into());
        }
        let buf = buf.strip_prefix(&[0xff]).unwrap_or(&buf);
        serde_json::from_slice(buf).map_err(|_| "the guest agent sent a line that is not JSON".to_string())
    }

    async fn execute<C: qapi::Command>(&mut self, cmd: C) -> Result<C::Ok, String> {
        self.send(cmd).await?;
        let reply = self.reply().await?;
        if let Some(e) = reply.get("error") {
            return Err(format!("guest agent: {} failed: {}", C::NAME, e["desc"].as_str().unwrap_or("?")));
        }
        serde_json::from_value(reply.get("return").cloned().unwrap_or(Value::Null))
            .map_err(|e| format!("guest agent: unexpected reply to {}: {e}", C::NAME))
    }
}

use tokio::io::AsyncReadExt as _;

/// `guest-ping` within `timeout`: the round trip, sync included.
pub async fn ping(path: &Path, timeout: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let ping = async {
        let mut agent = Agent::connect(path).await?;
        agent.execute(qapi::qga::guest_ping {}).await
    };
    match tokio::time::timeout(timeout, ping).await {
        Ok(Ok(_)) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer from the guest agent within {} ms", timeout.as_millis())),
    }
}

/// What the agent says about the guest: `guest-get-osinfo`, `guest-get-host-name` and
/// `guest-info` (version, supported commands), for bundles.
pub async fn describe(path: &Path, timeout: Duration) -> Result<Value, String> {
    let query = async {
        let mut agent = Agent::connect(path).await?;
        let os = agent.execute(qapi::qga::guest_get_osinfo {}).await?;
        let host = agent.execute(qapi::qga::guest_get_host_name {}).await.ok();
        let info = agent.execute(qapi::qga::guest_info {}).await?;
        Ok::<_, String>(json!({
            "osinfo": os,
            "host_name": host.map(|h| h.host_name),
            "agent_version": info.version,
        }))
    };
    tokio::time::timeout(timeout, query)
        .await
        .unwrap_or_else(|_| Err(format!("no answer from the guest agent within {} ms", timeout.as_millis())))
}
