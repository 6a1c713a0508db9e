//! The simulated VM's serial console: one client at a time, as a QEMU socket chardev serves.
//! Input is read and discarded, except a line `uptime`, which a live guest's shell echoes and
//! answers. The guest's kernel lines (boot, panic, NMI) go to the connected client.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;

use super::machine::Shared;

/// The shell's prompt.
pub(super) const PROMPT: &str = "~ # ";
/// Input bytes kept of one line; the rest of a longer line is dropped.
const MAX_INPUT_LINE: usize = 64;

/// Serves console clients one after the other until the VM is gone.
pub(super) async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    let mut gone = shared.subscribe_gone();
    while !*gone.borrow_and_update() {
        tokio::select! {
            _ = gone.changed() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => client(stream, &shared, &mut gone).await,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
        }
    }
}

async fn client(mut stream: UnixStream, shared: &Shared, gone: &mut watch::Receiver<bool>) {
    let mut output = shared.subscribe_console();
    let (mut read, mut write) = stream.split();
    let mut chunk = [0u8; 256];
    let mut line = Vec::new();
    let mut after_cr = false;
    loop {
        tokio::select! {
            biased;
            text = output.recv() => match text {
                Ok(text) => {
                    if write.write_all(text.as_bytes()).await.is_err() {
                        return;
                    }
                }
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            },
            _ = gone.changed() => return,
            n = read.read(&mut chunk) => {
                let n = match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                for &b in &chunk[..n] {
                    let was_cr = std::mem::replace(&mut after_cr, b == b'\r');
                    match b {
                        b'\n' if was_cr => {}
                        b'\r' | b'\n' => {
                            let answer = shell(shared, &line);
                            line.clear();
                            if let Some(answer) = answer {
                                if write.write_all(answer.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                        }
                        _ if line.len() < MAX_INPUT_LINE => line.push(b),
                        _ => {}
                    }
                }
            }
        }
    }
}

/// What a live guest's shell prints for one input line: the echo, `uptime`'s answer, the
/// prompt. `None` when the guest does not answer (hung, panicked, paused).
fn shell(shared: &Shared, line: &[u8]) -> Option<String> {
    let up = shared.console_uptime()?;
    let command = String::from_utf8_lossy(line);
    let mut out = format!("{command}\r\n");
    if command.trim() == "uptime" {
        out.push_str(&uptime_line(up, SystemTime::now()));
    }
    out.push_str(PROMPT);
    Some(out)
}

/// busybox `uptime`: ` HH:MM:SS up M min,  load average: 0.00, 0.00, 0.00`.
pub(super) fn uptime_line(up: Duration, now: SystemTime) -> String {
    let secs_of_day = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() % 86_400;
    let (h, m, s) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    let mins = up.as_secs() / 60;
    let up = if mins < 60 { format!("{mins} min") } else { format!("{}:{:02}", mins / 60, mins % 60) };
    format!(" {h:02}:{m:02}:{s:02} up {up},  load average: 0.00, 0.00, 0.00\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_looks_like_busybox() {
        let now = UNIX_EPOCH + Duration::from_secs(86_400 * 3 + 3600 * 13 + 60 * 4 + 5);
        assert_eq!(
            uptime_line(Duration::from_secs(125), now),
            " 13:04:05 up 2 min,  load average: 0.00, 0.00, 0.00\r\n"
        );
        assert!(uptime_line(Duration::from_secs(3 * 3600 + 7 * 60), now).contains("up 3:07,"));
    }
}
