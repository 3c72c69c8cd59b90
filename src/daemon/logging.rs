//! Logging: stdout, a log file that can be reopened (logrotate) or moved on
//! reload, and syslog; the level can change on reload.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::Level;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriter, MakeWriterExt};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Registry, reload};

use crate::config::{Config, syslog_facility};

/// The level a configuration asks for: `log-level`, else `-V` (trace),
/// `-v` (debug), else info.
pub fn level_for(cfg: &Config) -> LevelFilter {
    match (cfg.log_level, cfg.verbose) {
        (Some(l), _) => LevelFilter::from_level(l),
        (None, 0) => LevelFilter::INFO,
        (None, 1) => LevelFilter::DEBUG,
        (None, _) => LevelFilter::TRACE,
    }
}

/// The open log file, if any; shared with the writer.
#[derive(Clone, Default)]
struct LogFile(Arc<Mutex<Option<(PathBuf, File)>>>);

struct LogFileWriter<'a>(&'a LogFile);

impl Write for LogFileWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut *self.0.0.lock().expect("log file lock") {
            Some((_, f)) => f.write(buf),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut *self.0.0.lock().expect("log file lock") {
            Some((_, f)) => f.flush(),
            None => Ok(()),
        }
    }
}

impl<'a> MakeWriter<'a> for LogFile {
    type Writer = LogFileWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LogFileWriter(self)
    }
}

fn open(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open log file {}: {e}", path.display()))
}

/// Sends each formatted event to syslog(3) at the event's priority.
#[derive(Clone, Copy)]
struct Syslog;

struct SyslogWriter(libc::c_int);

impl Write for SyslogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let line = String::from_utf8_lossy(buf);
        let line = line.trim_end();
        if let Ok(c) = CString::new(line.replace('\0', " ")) {
            // SAFETY: a constant "%s" format with one valid C string.
            unsafe { libc::syslog(self.0, c"%s".as_ptr(), c.as_ptr()) };
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Syslog {
    type Writer = SyslogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        SyslogWriter(libc::LOG_INFO)
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        SyslogWriter(match *meta.level() {
            Level::ERROR => libc::LOG_ERR,
            Level::WARN => libc::LOG_WARNING,
            Level::INFO => libc::LOG_INFO,
            _ => libc::LOG_DEBUG,
        })
    }
}

/// The installed logger: change the level and reopen the file at run time.
pub struct Logging {
    level: reload::Handle<LevelFilter, Registry>,
    file: LogFile,
}

impl Logging {
    /// Installs the global logger for `cfg`: stdout unless a log file
    /// replaces it (`no-stdout-log`, or `daemon` which closes stdout), the
    /// log file, and syslog when asked.
    pub fn init(cfg: &Config) -> Result<Logging, String> {
        let file = LogFile::default();
        if let Some(path) = &cfg.log_file {
            *file.0.lock().expect("log file lock") = Some((path.clone(), open(path)?));
        }
        let stdout = cfg.log_file.is_none() || !(cfg.no_stdout_log || cfg.daemon);
        let mut writer = BoxMakeWriter::new(file.clone());
        if stdout {
            writer = BoxMakeWriter::new(writer.and(io::stdout));
        }
        if cfg.syslog {
            let facility = cfg
                .syslog_facility
                .as_deref()
                .and_then(syslog_facility)
                .unwrap_or(libc::LOG_DAEMON);
            // SAFETY: openlog with a static identifier string.
            unsafe { libc::openlog(c"turnserver".as_ptr(), libc::LOG_PID, facility) };
            writer = BoxMakeWriter::new(writer.and(Syslog));
        }
        let (filter, level) = reload::Layer::new(level_for(cfg));
        let fmt = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_target(false)
            .with_writer(writer);
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .try_init()
            .map_err(|e| format!("cannot install the logger: {e}"))?;
        Ok(Logging { level, file })
    }

    /// Changes the level.
    pub fn set_level(&self, level: LevelFilter) {
        let _ = self.level.modify(|l| *l = level);
    }

    /// Reopens the log file (after logrotate moved it), or switches to
    /// `path` when it changed. `None` closes the file.
    pub fn reopen(&self, path: Option<&Path>) -> Result<(), String> {
        let new = match path {
            Some(p) => Some((p.to_path_buf(), open(p)?)),
            None => None,
        };
        *self.file.0.lock().expect("log file lock") = new;
        Ok(())
    }
}
