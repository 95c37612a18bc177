#!/usr/bin/env bash
# Builds a libFuzzer target with the stable toolchain (coverage through
# LLVM's sancov pass; no sanitizer, which would need nightly) and runs it.
#
#   fuzz/run.sh frame_codec -max_total_time=60
#   fuzz/run.sh record_decode -max_total_time=60
#   fuzz/run.sh recovery -max_total_time=60 -timeout=10
#   fuzz/run.sh auth_handshake -max_total_time=60
#
# Arguments after the target go to libFuzzer. The working corpus lives in
# target/fuzz/corpus/TARGET and starts from the committed seeds
# (protocol/tests/corpus for frame_codec, fuzz/corpus/TARGET for the
# others); crashes are written to target/fuzz/artifacts/TARGET/.
set -euo pipefail
target=${1:?usage: fuzz/run.sh TARGET [libFuzzer args...]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
triple=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR="$root/target/fuzz"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
cargo build --manifest-path "$root/fuzz/Cargo.toml" --release --target "$triple" --bin "$target"
corpus="$CARGO_TARGET_DIR/corpus/$target"
artifacts="$CARGO_TARGET_DIR/artifacts/$target"
mkdir -p "$corpus" "$artifacts"
case "$target" in
    frame_codec) seeds="$root/protocol/tests/corpus" ;;
    *) seeds="$root/fuzz/corpus/$target" ;;
esac
cp -n "$seeds"/*.bin "$corpus"/ 2>/dev/null || true
exec "$CARGO_TARGET_DIR/$triple/release/$target" -artifact_prefix="$artifacts/" "$corpus" "$@"
