//! How an implemented option reads its value into [`Config`] and writes it
//! back out (`--check-config`): the kinds of value, each with its parser
//! and renderer, and [`Field`] to point at the setting's place in
//! [`Config`]. The option table ([`super::options::OPTIONS`]) pairs every
//! implemented option with one of these.

use std::net::IpAddr;
use std::path::PathBuf;

use super::{Config, parse_bool};

/// Where a setting lives in [`Config`]: a reader and a writer of the same
/// field, written with [`field!`](crate::config::setting::field).
pub struct Field<T: 'static> {
    pub get: fn(&Config) -> &T,
    pub set: fn(&mut Config) -> &mut T,
}

/// `field!(name)` or `field!(outer.inner)`: the [`Field`] of that
/// `Config` field.
macro_rules! field {
    ($($path:ident).+) => {
        $crate::config::setting::Field {
            get: |c| &c.$($path).+,
            set: |c| &mut c.$($path).+,
        }
    };
}
pub(crate) use field;

/// The lines `--check-config` prints for one option.
pub type Lines = Vec<String>;

/// What an implemented option does with its value.
pub enum Setting {
    /// On or off (`key`, `key=on`, `key=off`, …).
    Flag(Field<bool>),
    /// A flag that turns a setting off (`no-udp-gro` clears `udp_gro`).
    Inverted(Field<bool>),
    /// A port, 1–65535.
    Port(Field<u16>),
    /// A port, or 0 for none.
    PortOrNone(Field<Option<u16>>),
    /// A whole number.
    U32(Field<u32>),
    /// A whole number (bytes per second).
    U64(Field<u64>),
    /// Seconds, at least `min`; with `optional`, the value may be left out,
    /// which means the option's default (`--stale-nonce` alone).
    Seconds {
        field: Field<u32>,
        min: u32,
        optional: bool,
    },
    /// Free text.
    Text(Field<Option<String>>),
    /// A file path; an empty value means none.
    Path(Field<Option<PathBuf>>),
    /// An IP address.
    Ip(Field<Option<IpAddr>>),
    /// IP addresses, one per line (repeatable; duplicates dropped).
    Ips(Field<Vec<IpAddr>>),
    /// Anything else: its own parser and renderer.
    Custom {
        apply: fn(&mut Config, Option<&str>) -> Result<(), String>,
        render: fn(&Config, &str, &mut Lines),
        /// Whether the option may be repeated (values add up).
        repeat: bool,
        /// Whether the value may be left out (a flag-like option).
        flag: bool,
    },
}

/// The value of a setting that needs one. Error: "needs a value".
pub fn need(value: Option<&str>) -> Result<&str, String> {
    value.ok_or_else(|| "needs a value".to_string())
}

/// A boolean as coturn reads it (a bare flag is on).
pub fn flag(value: Option<&str>) -> Result<bool, String> {
    let v = value.unwrap_or("");
    parse_bool(v)
        .ok_or_else(|| format!("'{v}' is not a boolean (use on/off, yes/no, true/false, 1/0)"))
}

/// A port number, 1–65535.
pub fn port(v: &str) -> Result<u16, String> {
    match v.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(format!("'{v}' is not a port number (1-65535)")),
    }
}

/// An IP address, optionally in brackets.
pub fn ip(v: &str) -> Result<IpAddr, String> {
    let t = v.trim().trim_start_matches('[').trim_end_matches(']');
    t.parse().map_err(|_| format!("'{v}' is not an IP address"))
}

/// A whole number.
pub fn number<T: std::str::FromStr>(v: &str) -> Result<T, String> {
    v.trim()
        .parse()
        .map_err(|_| format!("'{v}' is not a number"))
}

/// `on` or `off`.
pub fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

impl Setting {
    /// Whether the option takes no value (a flag).
    pub fn is_flag(&self) -> bool {
        match self {
            Setting::Flag(_) | Setting::Inverted(_) => true,
            Setting::Custom { flag, .. } => *flag,
            _ => false,
        }
    }

    /// Whether the value may be left out although it is not a flag.
    pub fn is_optional(&self) -> bool {
        matches!(self, Setting::Seconds { optional: true, .. })
    }

    /// Whether the option may be repeated, its values adding up.
    pub fn is_repeatable(&self) -> bool {
        match self {
            Setting::Ips(_) => true,
            Setting::Custom { repeat, .. } => *repeat,
            _ => false,
        }
    }

    /// Applies `value` (`None` for a bare option) to `cfg`; `default` is
    /// the option's default, for a value left out. Error: what is wrong
    /// with the value.
    pub fn apply(
        &self,
        cfg: &mut Config,
        value: Option<&str>,
        default: Option<&str>,
    ) -> Result<(), String> {
        match self {
            Setting::Flag(f) => *(f.set)(cfg) = flag(value)?,
            Setting::Inverted(f) => *(f.set)(cfg) = !flag(value)?,
            Setting::Port(f) => *(f.set)(cfg) = port(need(value)?)?,
            Setting::PortOrNone(f) => {
                *(f.set)(cfg) = match need(value)?.trim() {
                    "0" => None,
                    v => Some(port(v)?),
                }
            }
            Setting::U32(f) => *(f.set)(cfg) = number(need(value)?)?,
            Setting::U64(f) => *(f.set)(cfg) = number(need(value)?)?,
            Setting::Seconds { field, min, .. } => {
                let v = value.or(default).unwrap_or("0");
                let secs: u32 = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("'{v}' is not a number of seconds"))?;
                *(field.set)(cfg) = secs.max(*min);
            }
            Setting::Text(f) => *(f.set)(cfg) = Some(need(value)?.to_string()),
            Setting::Path(f) => {
                *(f.set)(cfg) = value.filter(|v| !v.trim().is_empty()).map(PathBuf::from)
            }
            Setting::Ip(f) => *(f.set)(cfg) = Some(ip(need(value)?)?),
            Setting::Ips(f) => {
                let a = ip(need(value)?)?;
                let list = (f.set)(cfg);
                if !list.contains(&a) {
                    list.push(a);
                }
            }
            Setting::Custom { apply, .. } => apply(cfg, value)?,
        }
        Ok(())
    }

    /// The `key=value` lines for the setting's current value in `cfg` (none
    /// when it is unset).
    pub fn render(&self, cfg: &Config, key: &str, out: &mut Lines) {
        let mut kv = |v: &dyn std::fmt::Display| out.push(format!("{key}={v}"));
        match self {
            Setting::Flag(f) => kv(&on_off(*(f.get)(cfg))),
            Setting::Inverted(f) => kv(&on_off(!*(f.get)(cfg))),
            Setting::Port(f) => kv((f.get)(cfg)),
            Setting::PortOrNone(f) => kv(&(f.get)(cfg).unwrap_or(0)),
            Setting::U32(f) | Setting::Seconds { field: f, .. } => kv((f.get)(cfg)),
            Setting::U64(f) => kv((f.get)(cfg)),
            Setting::Text(f) => {
                if let Some(v) = (f.get)(cfg) {
                    kv(v)
                }
            }
            Setting::Path(f) => {
                if let Some(v) = (f.get)(cfg) {
                    kv(&v.display())
                }
            }
            Setting::Ip(f) => {
                if let Some(v) = (f.get)(cfg) {
                    kv(v)
                }
            }
            Setting::Ips(f) => {
                for a in (f.get)(cfg) {
                    kv(a)
                }
            }
            Setting::Custom { render, .. } => render(cfg, key, out),
        }
    }
}
