//! Steps on the serial console: its tail, SysRq, and an NMI's output. The console task keeps
//! reading the guest's output into its bounded ring whatever the guest does; these steps only
//! poll its position, so a guest that prints without end cannot hold them past their limits.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::{Ctx, Done, Keep, StepResult, SYSRQ_KEYS};
use crate::console::{Console, DEFAULT_KEEP};
use crate::trigger::qmp::{Qmp, QmpError};
use crate::units;

/// How often the console's position is looked at.
const POLL: Duration = Duration::from_millis(20);
/// A kernel that takes SysRq prints its "sysrq: ..." line at once: a key with no output this
/// long after it was sent is unanswered, and the remaining keys are not sent.
const ANSWER_WAIT: Duration = Duration::from_secs(2);
/// Kept free before a step's deadline to write its file.
const WRITE_MARGIN: Duration = Duration::from_millis(300);

/// How a wait for the console to go quiet ended.
struct Settled {
    /// Bytes printed after the mark.
    printed: u64,
    /// Whether it went quiet (rather than the limit ending the wait).
    quiet: bool,
}

/// Waits until the console has printed nothing for `quiet`, or until `until`. With `first`,
/// the wait for output to start after `mark` is bounded by it and nothing printed ends the
/// wait then; without, a console quiet from the start counts.
async fn settle(
    console: &Console,
    mark: u64,
    quiet: Duration,
    first: Option<Duration>,
    until: Instant,
) -> Settled {
    let t0 = Instant::now();
    let mut last = console.position();
    let mut changed = t0;
    loop {
        let now = Instant::now();
        let pos = console.position();
        if pos != last {
            last = pos;
            changed = now;
        }
        let started = pos > mark;
        let printed = pos.saturating_sub(mark);
        match first {
            Some(f) if !started => {
                if now >= t0 + f {
                    return Settled { printed, quiet: true };
                }
            }
            _ => {
                if now >= changed + quiet {
                    return Settled { printed, quiet: true };
                }
            }
        }
        if now >= until {
            return Settled { printed, quiet: false };
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The latest a step that writes a file may keep waiting.
fn wait_limit(ctx: &Ctx<'_>) -> Instant {
    let margin = WRITE_MARGIN.min(ctx.timeout / 4);
    ctx.deadline.checked_sub(margin).unwrap_or(ctx.deadline)
}

/// Output after `mark`, with a note when the console ring no longer holds all of it.
fn captured(console: &Console, mark: u64) -> String {
    let printed = console.position().saturating_sub(mark);
    let mut text = console.since(mark);
    if printed > DEFAULT_KEEP as u64 {
        text.insert_str(
            0,
            &format!("[acpimon: the guest printed {printed} bytes; only the last ones were kept]\n"),
        );
    }
    text
}

/// `console-tail`: waits until the console has been quiet for `settle` (so what the guest
/// prints just after the trigger is included), then writes the kept output.
pub(super) async fn tail(ctx: &Ctx<'_>, console: &Console, settle_for: Duration) -> StepResult {
    let mark = console.position();
    let s = settle(console, mark, settle_for, None, wait_limit(ctx)).await;
    let text = console.tail();
    let file = ctx.write("txt", text.as_bytes(), Keep::Tail).await?;
    Ok(Done::ok(Some(file), Some(json!({ "quiet": s.quiet, "printed_while_settling": s.printed }))))
}

/// `Err(skipped)` when QMP says the VM is not running: its vCPUs cannot answer, and a key or an
/// NMI sent now would only be acted on whenever it resumes. Unknown (no QMP, no answer) runs.
async fn must_run(ctx: &Ctx<'_>, qmp: Option<&Qmp>, what: &str) -> Result<(), Done> {
    let Some(qmp) = qmp else { return Ok(()) };
    match qmp.status(ctx.remaining().min(Duration::from_secs(2))).await {
        Ok(s) if !s.running => {
            Err(Done::skipped(format!("the VM is not running (status '{}'): {what}", s.status)))
        }
        _ => Ok(()),
    }
}

/// `sysrq`: for each key a serial break and the key, then the guest's output until quiet.
pub(super) async fn sysrq(
    ctx: &Ctx<'_>,
    console: &Console,
    qmp: Option<&Qmp>,
    keys: &str,
    per_key: Duration,
    quiet: Duration,
    chardev: &str,
) -> StepResult {
    if ctx.trigger.kind == "panicked" {
        return Err(Done::skipped("the guest kernel panicked: it no longer answers SysRq".into()));
    }
    must_run(ctx, qmp, "its kernel cannot answer SysRq").await?;
    let mut telnet = qmp.is_none();
    let mut out = String::new();
    let mut notes = Vec::new();
    let mut per = Vec::new();
    let mut unsent = String::new();
    let mut unanswered = None;
    for key in keys.chars() {
        if unanswered.is_some() || ctx.remaining() < WRITE_MARGIN * 2 {
            unsent.push(key);
            continue;
        }
        let mark = console.position();
        let sent = super::now();
        if let (false, Some(q)) = (telnet, qmp) {
            match q
                .execute_within(qapi::qmp::chardev_send_break { id: chardev.into() }, ctx.remaining())
                .await
            {
                Ok(_) => {}
                Err(QmpError::Command { desc, .. }) if desc.contains("not found") => {
                    notes.push(format!(
                        "QMP has no chardev '{chardev}' ({desc}): sent telnet IAC BRK on the console instead"
                    ));
                    telnet = true;
                }
                Err(e) => {
                    let file = write_sysrq(ctx, &out, &notes).await.ok();
                    return Err(Done::qmp("chardev-send-break", e).with_file(file));
                }
            }
        }
        let mut bytes = Vec::with_capacity(3);
        if telnet {
            // Telnet IAC BRK: a chardev with telnet=on turns it into a serial break.
            bytes.extend_from_slice(&[0xff, 0xf3]);
        }
        bytes.push(key as u8);
        // A guest that does not drain its serial port can fill the socket: bounded.
        let send = tokio::time::timeout_at(wait_limit(ctx), console.send(&bytes)).await;
        if let Some(why) = match send {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("cannot write to the console: {e}")),
            Err(_) => {
                Some("the console does not take input (the guest is not reading its serial port)".into())
            }
        } {
            let file = write_sysrq(ctx, &out, &notes).await.ok();
            return Err(Done::failed(why).with_file(file));
        }
        let until = (Instant::now() + per_key).min(wait_limit(ctx));
        let s = settle(console, mark, quiet, Some(per_key.min(ANSWER_WAIT)), until).await;
        if s.printed == 0 {
            unanswered = Some(key);
        }
        let text = captured(console, mark);
        let what = SYSRQ_KEYS.iter().find(|(k, ..)| *k == key).map_or("?", |(_, w, _)| w);
        out.push_str(&format!("=== sysrq '{key}' ({what}), sent {sent} ===\n{text}"));
        if !text.ends_with('\n') {
            out.push('\n');
        }
        let header = text
            .lines()
            .find_map(|l| l.split_once("sysrq: ").map(|(_, h)| h.chars().take(200).collect::<String>()));
        per.push(json!({
            "key": key.to_string(),
            "bytes": s.printed,
            "header": header,
            "disabled": text.contains("This sysrq operation is disabled"),
            "quiet": s.quiet,
        }));
    }
    let file = write_sysrq(ctx, &out, &notes).await?;
    let summary = json!({ "break": if telnet { "telnet" } else { "qmp" }, "keys": per, "notes": notes });
    if let (Some(key), false) = (unanswered, unsent.is_empty()) {
        let wait = units::format_duration(per_key.min(ANSWER_WAIT));
        return Err(Done::failed(format!(
            "the guest printed nothing within {wait} of key '{key}': keys '{unsent}' not sent (SysRq disabled, the \
             serial port not the kernel's console, or the kernel not taking interrupts)"
        ))
        .with_file(Some(file))
        .with_summary(summary));
    }
    if !unsent.is_empty() {
        return Err(Done::timeout(format!(
            "keys '{unsent}' not sent: the step's timeout of {} was used up",
            ctx.timeout_text()
        ))
        .with_file(Some(file))
        .with_summary(summary));
    }
    // Success is the kernel answering: its "sysrq: ..." line (any output could be a shell
    // echoing the key when no break arrived).
    let answered = per.iter().any(|k| k["header"].is_string() && k["disabled"] == false);
    if !answered {
        let why = if per.iter().any(|k| k["disabled"] == true) {
            "the kernel refuses these SysRq keys (kernel.sysrq masks them; 1 enables all)".to_string()
        } else if per.iter().any(|k| k["bytes"] != 0) {
            format!(
                "no key was taken as SysRq (no \"sysrq:\" line; the {} break did not reach the kernel, or the \
                 serial port is not the kernel's console)",
                if telnet { "telnet" } else { "QMP" }
            )
        } else {
            "the guest printed nothing after any key: SysRq disabled (kernel.sysrq = 0), the serial port not the \
             kernel's console, or the kernel not taking interrupts"
                .to_string()
        };
        return Err(Done::failed(why).with_file(Some(file)).with_summary(summary));
    }
    Ok(Done::ok(Some(file), Some(summary)))
}

async fn write_sysrq(ctx: &Ctx<'_>, out: &str, notes: &[String]) -> Result<String, Done> {
    let mut text = String::new();
    for n in notes {
        text.push_str(&format!("[acpimon: {n}]\n"));
    }
    text.push_str(out);
    ctx.write("txt", text.as_bytes(), Keep::Head).await
}

/// `inject-nmi`: QMP `inject-nmi`, then what the guest prints, when there is a console.
pub(super) async fn inject_nmi(
    ctx: &Ctx<'_>,
    qmp: &Qmp,
    console: Option<&Console>,
    capture: Duration,
    quiet: Duration,
) -> StepResult {
    must_run(ctx, Some(qmp), "the NMI would wait until it resumes").await?;
    let mark = console.map(Console::position);
    qmp.execute_within(qapi::qmp::inject_nmi {}, ctx.remaining())
        .await
        .map_err(|e| Done::qmp("inject-nmi", e))?;
    let (Some(console), Some(mark)) = (console, mark) else {
        return Ok(Done::ok(None, Some(json!({ "console": false, "printed": Value::Null }))));
    };
    let until = (Instant::now() + capture).min(wait_limit(ctx));
    let s = settle(console, mark, quiet, Some(capture), until).await;
    let text = format!("=== inject-nmi, sent {} ===\n{}", super::now(), captured(console, mark));
    let file = ctx.write("txt", text.as_bytes(), Keep::Head).await?;
    Ok(Done::ok(Some(file), Some(json!({ "console": true, "printed": s.printed }))))
}
