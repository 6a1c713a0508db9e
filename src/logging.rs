//! Where the service's log lines go. Every log line is a `tracing` event; [`init`] sets up the
//! one subscriber that filters and writes them, in one of three shapes:
//!
//! - **text** (the default): `TIME [LEVEL: ][VM: ]MESSAGE[ key=value…]`. Info and debug lines
//!   go to stdout, warnings and errors to stderr; info has no level word, so the lines the demo
//!   and the README show (`… demo: healthy -> paused: …`) read as they always have.
//! - **journal**, chosen by itself when stdout or stderr is connected to the systemd journal
//!   (`JOURNAL_STREAM` names that stream): `<PRIORITY>[VM: ]MESSAGE[ key=value…]`, no time
//!   (journald stamps each line) and an sd-daemon(3) priority prefix, so `journalctl -p warning`
//!   works; every line goes to the journal stream.
//! - **json** (`--log-format json`): one object per line on stderr,
//!   `{"time", "level", "target", "vm"?, "message", …fields}`.
//!
//! Lines of one VM's monitor carry `vm`: the monitor runs inside a span named `vm` with a field
//! `vm`, and an event may name its VM itself with a `vm` field.
//!
//! What shows: `RUST_LOG` (an env-filter directive, e.g. `acpimon::qmp=debug`) when no `-v`/`-q`
//! is given, else `info`; `-v` adds acpimon's debug lines (QMP messages it does not route), `-vv`
//! trace; `-q` keeps warnings and errors, `-qq` errors only. The former `ACPIMON_DEBUG_QMP=1` still
//! turns the QMP debug lines on.

use std::fmt::Write as _;
use std::io::IsTerminal;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriterExt};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human lines (journal lines with priorities when systemd's journal is the output).
    #[default]
    Text,
    /// One JSON object per line, on stderr.
    Json,
}

/// What the command line says about logging.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub format: LogFormat,
    /// `-v` count minus `-q` count.
    pub verbosity: i8,
}

/// The shape of the lines, after looking at the environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Text,
    Journal,
    Json,
}

/// Which standard stream systemd connected to the journal, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

/// Installs the global subscriber. Call once, first thing in `main`; a second call does
/// nothing (tests may run several commands in one process).
pub fn init(opts: Options) {
    let journal = journal_stream();
    let shape = match (opts.format, journal) {
        (LogFormat::Json, _) => Shape::Json,
        (LogFormat::Text, Some(_)) => Shape::Journal,
        (LogFormat::Text, None) => Shape::Text,
    };
    let (filter, bad_env) = filter(opts.verbosity);
    let writer = match (shape, journal) {
        (Shape::Journal, Some(Stream::Stdout)) => BoxMakeWriter::new(std::io::stdout),
        (Shape::Text, _) => {
            BoxMakeWriter::new(std::io::stderr.with_max_level(Level::WARN).or_else(std::io::stdout))
        }
        _ => BoxMakeWriter::new(std::io::stderr),
    };
    let installed = subscriber(shape, filter, writer).try_init().is_ok();
    if let (true, Some(e)) = (installed, bad_env) {
        tracing::warn!("RUST_LOG is not a valid filter ({e}); logging at the default level");
    }
}

/// The layers: the filter, the VM tagger, the line formatter writing to `writer`.
fn subscriber<W>(shape: Shape, filter: EnvFilter, writer: W) -> impl Subscriber + Send + Sync
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let lines =
        tracing_subscriber::fmt::layer().with_ansi(false).event_format(Lines { shape }).with_writer(writer);
    tracing_subscriber::registry().with(filter).with(VmTag).with(lines)
}

/// The filter, and why `RUST_LOG` was ignored if it was.
fn filter(verbosity: i8) -> (EnvFilter, Option<String>) {
    let level = match verbosity {
        i8::MIN..=-2 => "error",
        -1 => "warn",
        0 => "info",
        1 => "info,acpimon=debug",
        _ => "debug,acpimon=trace",
    };
    let mut bad = None;
    let mut filter = match std::env::var("RUST_LOG") {
        Ok(env) if verbosity == 0 && !env.trim().is_empty() => EnvFilter::try_new(&env).unwrap_or_else(|e| {
            bad = Some(e.to_string());
            EnvFilter::new(level)
        }),
        _ => EnvFilter::new(level),
    };
    if std::env::var_os("ACPIMON_DEBUG_QMP").is_some() {
        filter = filter.add_directive("acpimon::qmp=debug".parse().expect("a valid directive"));
    }
    (filter, bad)
}

/// The stream `JOURNAL_STREAM` (`DEVICE:INODE`, set by systemd) names, if it is really ours:
/// a child whose output a user redirected inherits the variable but not the stream.
fn journal_stream() -> Option<Stream> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let value = std::env::var("JOURNAL_STREAM").ok()?;
    let (dev, ino) = value.trim().split_once(':')?;
    let (dev, ino): (u64, u64) = (dev.parse().ok()?, ino.parse().ok()?);
    let same = |fd: std::os::fd::BorrowedFd<'_>| {
        let file = std::fs::File::from(fd.try_clone_to_owned().ok()?);
        let m = file.metadata().ok()?;
        Some(m.dev() == dev && m.ino() == ino)
    };
    // stdout is checked only when stderr is not the journal, and never when it is a terminal.
    if same(std::io::stderr().as_fd()) == Some(true) {
        Some(Stream::Stderr)
    } else if !std::io::stdout().is_terminal() && same(std::io::stdout().as_fd()) == Some(true) {
        Some(Stream::Stdout)
    } else {
        None
    }
}

/// The VM a span is about, recorded when a span with a `vm` field opens.
struct VmName(String);

/// Remembers the `vm` field of every span that has one.
struct VmTag;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for VmTag {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let (Some(vm), Some(span)) = (fields.vm, ctx.span(id)) {
            span.extensions_mut().insert(VmName(vm));
        }
    }
}

/// An event's (or span's) fields, collected.
#[derive(Default)]
struct Fields {
    message: String,
    vm: Option<String>,
    rest: Vec<(&'static str, Value)>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        match (field.name(), value) {
            ("message", Value::String(s)) => self.message = s,
            ("vm", Value::String(s)) => self.vm = Some(s),
            (name, v) => self.rest.push((name, v)),
        }
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_string()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
}

/// Formats one event in the chosen shape.
struct Lines {
    shape: Shape,
}

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut f = Fields::default();
        event.record(&mut f);
        // The innermost span that names a VM, unless the event names one itself.
        if f.vm.is_none() {
            if let Some(scope) = ctx.event_scope() {
                f.vm = scope
                    .from_root()
                    .filter_map(|s| s.extensions().get::<VmName>().map(|v| v.0.clone()))
                    .last();
            }
        }
        let level = *event.metadata().level();
        let line = match self.shape {
            Shape::Json => json_line(&f, level, event.metadata().target()),
            Shape::Text => {
                let tag = match level {
                    Level::ERROR => "error: ",
                    Level::WARN => "warning: ",
                    Level::INFO => "",
                    Level::DEBUG => "debug: ",
                    Level::TRACE => "trace: ",
                };
                format!("{} {tag}{}", crate::units::now_rfc3339(), human(&f))
            }
            Shape::Journal => format!("<{}>{}", priority(level), human(&f)),
        };
        writeln!(w, "{line}")
    }
}

/// The sd-daemon(3) priority of a level: err, warning, info, debug.
fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// `[VM: ]MESSAGE[ key=value…]`, on one line whatever the message holds.
fn human(f: &Fields) -> String {
    let mut out = String::new();
    if let Some(vm) = &f.vm {
        let _ = write!(out, "{vm}: ");
    }
    out.push_str(&f.message);
    for (name, value) in &f.rest {
        let _ = match value {
            Value::String(s)
                if !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || c == '"' || c == '=') =>
            {
                write!(out, " {name}={s}")
            }
            v => write!(out, " {name}={v}"),
        };
    }
    // A message that spans lines would split into several journal entries.
    if out.contains(['\n', '\r']) {
        out = out.replace('\r', "").replace('\n', " | ");
    }
    out
}

fn json_line(f: &Fields, level: Level, target: &str) -> String {
    let mut m = Map::new();
    m.insert("time".into(), crate::units::now_rfc3339().into());
    m.insert("level".into(), level.as_str().to_ascii_lowercase().into());
    m.insert("target".into(), target.into());
    if let Some(vm) = &f.vm {
        m.insert("vm".into(), vm.clone().into());
    }
    m.insert("message".into(), f.message.clone().into());
    for (name, value) in &f.rest {
        m.entry(name.to_string()).or_insert_with(|| value.clone());
    }
    Value::Object(m).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(vm: Option<&str>, message: &str, rest: &[(&'static str, Value)]) -> Fields {
        Fields { message: message.into(), vm: vm.map(String::from), rest: rest.to_vec() }
    }

    #[test]
    fn human_lines_read_as_before_and_quote_only_what_needs_it() {
        assert_eq!(human(&fields(Some("demo"), "bundle written: /b", &[])), "demo: bundle written: /b");
        assert_eq!(
            human(&fields(
                None,
                "cannot touch",
                &[("path", "/run/x".into()), ("error", "No such file".into())]
            )),
            "cannot touch path=/run/x error=\"No such file\""
        );
        assert_eq!(human(&fields(None, "two\nlines", &[("n", 3.into())])), "two | lines n=3");
    }

    #[test]
    fn json_lines_are_flat_objects() {
        let line =
            json_line(&fields(Some("web"), "hello", &[("n", 3.into())]), Level::WARN, "acpimon::watch");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "warn");
        assert_eq!(v["vm"], "web");
        assert_eq!(v["message"], "hello");
        assert_eq!(v["n"], 3);
        assert_eq!(v["target"], "acpimon::watch");
    }

    /// Everything the subscriber writes, for one test.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn capture(shape: Shape, f: impl FnOnce()) -> String {
        let out = Captured::default();
        let writer = {
            let out = out.clone();
            move || out.clone()
        };
        tracing::subscriber::with_default(subscriber(shape, EnvFilter::new("debug"), writer), f);
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn a_vm_span_tags_every_line_inside_it() {
        let out = capture(Shape::Journal, || {
            tracing::info!("before");
            let span = tracing::info_span!("vm", vm = "web");
            span.in_scope(|| {
                tracing::info!("healthy -> paused: QMP STOP");
                tracing::debug_span!("probe", n = 1).in_scope(|| tracing::warn!(misses = 2, "late"));
                tracing::error!(vm = "other", "named by the event");
            });
        });
        assert_eq!(
            out,
            "<6>before\n<6>web: healthy -> paused: QMP STOP\n<4>web: late misses=2\n<3>other: named by the event\n"
        );
    }

    #[test]
    fn text_lines_start_with_the_time_and_name_the_level_unless_info() {
        let out = capture(Shape::Text, || {
            tracing::info_span!("vm", vm = "web").in_scope(|| tracing::info!("bundle written: /b"));
            tracing::warn!("careful");
        });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(lines[0].ends_with("Z web: bundle written: /b"), "{out}");
        assert!(lines[1].ends_with("Z warning: careful"), "{out}");
        assert!(lines.iter().all(|l| l.starts_with("20")), "{out}");
    }

    #[test]
    fn levels_map_to_sd_daemon_priorities() {
        assert_eq!([Level::ERROR, Level::WARN, Level::INFO, Level::DEBUG].map(priority), [3, 4, 6, 7]);
    }
}
