#!/usr/bin/env bash
# The test command: installs what the tests need (Debian's coturn for
# turnutils_uclient/turnutils_peer, Debian's chromium, playwright-core from
# npm), then runs formatting, lint and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
command -v turnutils_uclient >/dev/null 2>&1 || missing+=(coturn)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
# The tests only need coturn's client tools; its own daemon must not hold
# ports or relay ranges while they run.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    as_root systemctl disable --now coturn >/dev/null 2>&1 || true
fi

echo "==> npm ci (tests/browser)"
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)

echo "==> cargo fmt --check"
cargo fmt --check
cargo fmt --check --manifest-path fuzz/Cargo.toml
echo "==> cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "==> cargo test"
cargo test --locked

# Bounded fuzzing of the codec, stream framing and the TURN core, from the
# committed seeds (RUSTC_BOOTSTRAP lets cargo-fuzz use the stable
# toolchain). FUZZ_SECONDS=0 skips it.
FUZZ_SECONDS=${FUZZ_SECONDS:-45}
if [ "$FUZZ_SECONDS" -gt 0 ]; then
    echo "==> cargo fuzz (${FUZZ_SECONDS} s per target)"
    command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
    (
        cd fuzz
        export RUSTC_BOOTSTRAP=1
        cargo fuzz build
        for target in stun_parse stream_framing core_sequence; do
            corpus=$(mktemp -d)
            cargo fuzz run "$target" "$corpus" "seeds/$target" -- -max_total_time="$FUZZ_SECONDS"
            rm -rf "$corpus"
        done
    )
fi
