//! Settings from the environment, for containers: every option as
//! `TURNSERVER_<OPTION>`, the variables of the coturn images operators
//! already run (`TURN_USERNAME`, `TURN_PASSWORD`, `REALM`, `EXTERNAL_IP`,
//! `NAT`), and `<VARIABLE>_FILE` for each of them, naming a file that holds
//! the value (Docker and Kubernetes secrets).
//!
//! Precedence: the configuration file, then the environment, then the
//! command line; for a repeatable option the values add up in that order.
//! An empty variable counts as unset (compose files often pass `${X}` for
//! an unset `X`).

use super::options::{self, OPTIONS};
use super::{ConfigError, Entry, Origin, parse_bool};

/// The prefix of the variable naming each option.
pub const PREFIX: &str = "TURNSERVER_";

/// The variable that sets `option`: `TURNSERVER_` and the name in upper
/// case with `-` as `_` (`min-port` → `TURNSERVER_MIN_PORT`). Options whose
/// name has capitals (`Verbose`, which differs from `verbose` only in case)
/// have none.
pub fn variable(option: &str) -> Option<String> {
    if option.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    Some(format!(
        "{PREFIX}{}",
        option.to_ascii_uppercase().replace('-', "_")
    ))
}

/// Repeatable options whose values may hold a comma: several values come
/// one per line.
const NEWLINE_ONLY: &[&str] = &["user", "static-auth-secret"];

/// What [`entries`] read.
#[derive(Debug, Default)]
pub struct FromEnv {
    pub entries: Vec<Entry>,
    /// The variables used, for the start-up log (`TURN_PASSWORD_FILE`, ...).
    pub used: Vec<String>,
}

/// One variable's value: `NAME`, or the contents of the file `NAME_FILE`
/// names (without its trailing newline). Both set is an error, as is a file
/// that cannot be read.
fn value(
    get: &dyn Fn(&str) -> Option<String>,
    name: &str,
    used: &mut Vec<String>,
) -> Result<Option<(String, Origin)>, ConfigError> {
    let file_var = format!("{name}_FILE");
    let direct = get(name).filter(|v| !v.is_empty());
    let file = get(&file_var).filter(|v| !v.is_empty());
    match (direct, file) {
        (Some(_), Some(_)) => Err(ConfigError {
            origin: Origin::Environment { var: name.into() },
            key: String::new(),
            message: format!("both {name} and {file_var} are set; use one"),
        }),
        (Some(v), None) => {
            used.push(name.to_string());
            Ok(Some((v, Origin::Environment { var: name.into() })))
        }
        (None, Some(path)) => {
            let origin = Origin::Environment {
                var: file_var.clone(),
            };
            let text = std::fs::read_to_string(&path).map_err(|e| ConfigError {
                origin: origin.clone(),
                key: String::new(),
                message: format!("cannot read {path}: {e}"),
            })?;
            used.push(file_var);
            Ok(Some((
                text.trim_end_matches(['\n', '\r']).to_string(),
                origin,
            )))
        }
        (None, None) => Ok(None),
    }
}

/// Reads the settings `get` (the environment, or a test's map) holds.
///
/// The coturn image's variables come first, so that a `TURNSERVER_`
/// variable for the same option is applied after them:
/// - `TURN_USERNAME` and `TURN_PASSWORD` (both or neither): `user=U:P` and
///   `lt-cred-mech`;
/// - `REALM`: `realm`;
/// - `EXTERNAL_IP`: `external-ip` (an address, `public/private`, or `auto`);
///   `NAT=true` without `EXTERNAL_IP` means `external-ip=auto`.
///
/// Errors: a variable and its `_FILE` twin both set, an unreadable file, a
/// user name without a password or the other way round, a `NAT` that is
/// not a boolean.
pub fn entries(get: &dyn Fn(&str) -> Option<String>) -> Result<FromEnv, ConfigError> {
    let mut out = FromEnv::default();
    let mut push = |key: &str, value: Option<String>, origin: Origin| {
        out.entries.push(Entry {
            key: key.to_string(),
            value,
            origin,
        })
    };
    let mut used = Vec::new();
    let user = value(get, "TURN_USERNAME", &mut used)?;
    let password = value(get, "TURN_PASSWORD", &mut used)?;
    match (user, password) {
        (Some((u, origin)), Some((p, _))) => {
            push("user", Some(format!("{u}:{p}")), origin.clone());
            push("lt-cred-mech", None, origin);
        }
        (Some((_, origin)), None) | (None, Some((_, origin))) => {
            return Err(ConfigError {
                origin,
                key: "user".into(),
                message: "TURN_USERNAME and TURN_PASSWORD go together; set both".into(),
            });
        }
        (None, None) => {}
    }
    if let Some((realm, origin)) = value(get, "REALM", &mut used)? {
        push("realm", Some(realm), origin);
    }
    let external = value(get, "EXTERNAL_IP", &mut used)?;
    let nat = value(get, "NAT", &mut used)?;
    match (external, nat) {
        (Some((ip, origin)), _) => push("external-ip", Some(ip), origin),
        (None, Some((v, origin))) => match parse_bool(&v) {
            Some(true) => push("external-ip", Some("auto".into()), origin),
            Some(false) => {}
            None => {
                return Err(ConfigError {
                    origin,
                    key: "external-ip".into(),
                    message: format!("NAT={v}: expected true or false"),
                });
            }
        },
        (None, None) => {}
    }
    for spec in OPTIONS {
        let Some(var) = variable(spec.name) else {
            continue;
        };
        let Some((v, origin)) = value(get, &var, &mut used)? else {
            continue;
        };
        if spec.repeatable() {
            let by_comma = !NEWLINE_ONLY.contains(&spec.name);
            for one in v
                .split(|c| c == '\n' || (by_comma && c == ','))
                .map(str::trim)
                .filter(|s| !s.is_empty())
            {
                push(spec.name, Some(one.to_string()), origin.clone());
            }
        } else if spec.arg() == options::Arg::Flag && v.trim().is_empty() {
            push(spec.name, None, origin);
        } else {
            push(spec.name, Some(v), origin);
        }
    }
    out.used = used;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn read(vars: &[(&str, &str)]) -> Result<FromEnv, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        entries(&move |k: &str| map.get(k).cloned())
    }

    fn pairs(e: &FromEnv) -> Vec<(String, Option<String>)> {
        e.entries
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect()
    }

    #[test]
    fn variable_names() {
        assert_eq!(variable("min-port").unwrap(), "TURNSERVER_MIN_PORT");
        assert_eq!(
            variable("static-auth-secret").unwrap(),
            "TURNSERVER_STATIC_AUTH_SECRET"
        );
        assert_eq!(variable("Verbose"), None);
        // No two options share a variable.
        let mut seen = std::collections::HashSet::new();
        for spec in OPTIONS {
            if let Some(v) = variable(spec.name) {
                assert!(seen.insert(v.clone()), "{v} twice");
            }
        }
    }

    #[test]
    fn coturn_image_variables() {
        let e = read(&[
            ("TURN_USERNAME", "alice"),
            ("TURN_PASSWORD", "s3cret:with,comma"),
            ("REALM", "example.org"),
            ("NAT", "true"),
        ])
        .unwrap();
        assert_eq!(
            pairs(&e),
            vec![
                ("user".into(), Some("alice:s3cret:with,comma".into())),
                ("lt-cred-mech".into(), None),
                ("realm".into(), Some("example.org".into())),
                ("external-ip".into(), Some("auto".into())),
            ]
        );
        assert_eq!(e.used, ["TURN_USERNAME", "TURN_PASSWORD", "REALM", "NAT"]);
        // EXTERNAL_IP wins over NAT; NAT=false is nothing.
        let e = read(&[("EXTERNAL_IP", "203.0.113.5/10.0.0.5"), ("NAT", "true")]).unwrap();
        assert_eq!(
            pairs(&e),
            vec![("external-ip".into(), Some("203.0.113.5/10.0.0.5".into()))]
        );
        assert!(read(&[("NAT", "no")]).unwrap().entries.is_empty());
        assert!(read(&[("NAT", "maybe")]).is_err());
        let err = read(&[("TURN_USERNAME", "alice")]).unwrap_err();
        assert!(err.to_string().contains("TURN_PASSWORD"), "{err}");
        // Empty means unset.
        assert!(
            read(&[("REALM", ""), ("TURNSERVER_MIN_PORT", "")])
                .unwrap()
                .entries
                .is_empty()
        );
    }

    #[test]
    fn options_and_repeatable_values() {
        let e = read(&[
            ("TURNSERVER_MIN_PORT", "50000"),
            ("TURNSERVER_FINGERPRINT", ""),
            ("TURNSERVER_NO_TLS", "true"),
            ("TURNSERVER_LISTENING_IP", "127.0.0.1, ::1\n127.0.0.2"),
            ("TURNSERVER_USER", "a:b,c\nd:e"),
        ])
        .unwrap();
        let p = pairs(&e);
        assert!(p.contains(&("min-port".into(), Some("50000".into()))));
        assert!(p.contains(&("no-tls".into(), Some("true".into()))));
        assert!(!p.iter().any(|(k, _)| k == "fingerprint"));
        let ips: Vec<_> = p.iter().filter(|(k, _)| k == "listening-ip").collect();
        assert_eq!(ips.len(), 3);
        let users: Vec<_> = p
            .iter()
            .filter(|(k, _)| k == "user")
            .map(|(_, v)| v.clone())
            .collect();
        assert_eq!(users, [Some("a:b,c".into()), Some("d:e".into())]);
    }

    #[test]
    fn values_from_files() {
        let dir = std::env::temp_dir().join(format!("turnserver-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, "0123abcd\n").unwrap();
        let path = secret.to_str().unwrap();
        let e = read(&[("TURNSERVER_STATIC_AUTH_SECRET_FILE", path)]).unwrap();
        assert_eq!(
            pairs(&e),
            vec![("static-auth-secret".into(), Some("0123abcd".into()))]
        );
        assert_eq!(e.used, ["TURNSERVER_STATIC_AUTH_SECRET_FILE"]);
        let e = read(&[("TURN_USERNAME", "u"), ("TURN_PASSWORD_FILE", path)]).unwrap();
        assert_eq!(pairs(&e)[0], ("user".into(), Some("u:0123abcd".into())));
        let both = read(&[("REALM", "a"), ("REALM_FILE", path)]).unwrap_err();
        assert!(both.to_string().contains("REALM_FILE"), "{both}");
        let missing = read(&[("REALM_FILE", "/nonexistent/realm")]).unwrap_err();
        assert!(
            missing.to_string().contains("/nonexistent/realm"),
            "{missing}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
