//! The sans-IO core (`proto/`, the `turnserver-proto` crate) cannot reach
//! the outside world, by construction: its dependencies hold no I/O crate,
//! and a copy of it that calls a clock, a socket or a thread fails
//! `cargo clippy -- -D warnings` (its `clippy.toml`).

mod common;

use std::path::Path;
use std::process::Command;

use common::TempDir;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

#[test]
fn the_core_depends_on_no_io_crate() {
    let out = cargo()
        .current_dir(ROOT)
        .args([
            "tree",
            "--offline",
            "-p",
            "turnserver-proto",
            "-e",
            "normal",
        ])
        .args(["--prefix", "none", "--format", "{p}"])
        .output()
        .expect("cargo tree");
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(tree.contains("turnserver-proto"), "{tree}");
    for io in [
        "tokio",
        "mio",
        "nix",
        "libc",
        "socket2",
        "rustls",
        "hyper",
        "rand",
        "getrandom",
    ] {
        assert!(
            !tree.lines().any(|l| l.split(' ').next() == Some(io)),
            "the core depends on {io}:\n{tree}"
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn a_clock_a_socket_or_a_thread_in_the_core_fails_the_build() {
    let dir = TempDir::new("boundary");
    let copy = dir.path("proto");
    let proto = Path::new(ROOT).join("proto");
    copy_dir(&proto.join("src"), &copy.join("src"));
    for f in ["Cargo.toml", "clippy.toml"] {
        std::fs::copy(proto.join(f), copy.join(f)).unwrap();
    }
    // The workspace's versions, so nothing is fetched.
    std::fs::copy(Path::new(ROOT).join("Cargo.lock"), copy.join("Cargo.lock")).unwrap();
    let lib = copy.join("src/lib.rs");
    let mut text = std::fs::read_to_string(&lib).unwrap();
    text.push_str(
        "\npub fn reaches_out() {\n    let _ = std::time::Instant::now();\n    let _ = std::net::UdpSocket::bind(\"127.0.0.1:0\");\n    let _ = std::thread::spawn(|| ());\n}\n",
    );
    std::fs::write(&lib, text).unwrap();
    let out = cargo()
        .current_dir(&copy)
        .env(
            "CARGO_TARGET_DIR",
            Path::new(ROOT).join("target/boundary-check"),
        )
        .args(["clippy", "--offline", "--quiet", "--", "-D", "warnings"])
        .output()
        .expect("cargo clippy");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "clippy passed a core that reaches out:\n{err}"
    );
    for call in [
        "std::time::Instant::now",
        "std::net::UdpSocket::bind",
        "std::thread::spawn",
    ] {
        assert!(
            err.contains(&format!("use of a disallowed method `{call}`")),
            "{call} not refused:\n{err}"
        );
    }
}
