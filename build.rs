//! Compiles the eBPF ChannelData fast path (src/server/offload/relay.bpf.c)
//! with clang, for `server::offload` to embed. Without clang (or with
//! `TURNSERVER_NO_EBPF=1`) the server builds without it and `ebpf-offload`
//! can only be `off`; the `ebpf` cfg says which.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "src/server/offload/relay.bpf.c";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=TURNSERVER_NO_EBPF");
    println!("cargo:rerun-if-env-changed=CLANG");
    // Built again once clang appears (a build without it would otherwise
    // stay cached without the fast path).
    println!("cargo:rerun-if-changed=/usr/bin/clang");
    println!("cargo:rustc-check-cfg=cfg(ebpf)");
    if std::env::var_os("TURNSERVER_NO_EBPF").is_some_and(|v| v != "0") {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("relay.bpf.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    // The host's multiarch include directory holds asm/types.h for the
    // kernel headers.
    let multiarch = Command::new("gcc")
        .arg("-dumpmachine")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| format!("{}-linux-gnu", std::env::consts::ARCH));
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-target", "bpf"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .args(["-c", source, "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => println!("cargo:rustc-cfg=ebpf"),
        Ok(s) => println!(
            "cargo:warning=eBPF fast path not built: {clang} failed on {source} ({s}); install clang and libbpf-dev"
        ),
        Err(e) => println!(
            "cargo:warning=eBPF fast path not built: cannot run {clang} ({e}); install clang and libbpf-dev"
        ),
    }
}
