#!/usr/bin/env bash
# Coverage-guided fuzzing of faultline's parsers and state machines on stable Rust, with
# cargo-fuzz and libFuzzer, no sanitizer (`-s none`: a panic or a failed check is the bug
# report). The target bodies are in fuzz/src (crate faultline-fuzz, which `cargo test`
# replays); fuzz/cargo-fuzz wraps each one in a fuzz_target!. See docs/fuzzing.md.
#
# Usage: scripts/fuzz.sh [TARGET|all] [SECONDS] [-- LIBFUZZER_ARGS...]
#   TARGET   codec, proto, guest_agent, replica, nbd, vhost_blk, control, plan_file,
#            orchestrate, or all (default: all, one after the other)
#   SECONDS  wall time per target (default 180), one fuzzing process at a time
#
# Installs cargo-fuzz with `cargo install` when missing. New inputs go to
# fuzz/corpus/TARGET (not committed); the committed seeds in fuzz/seeds/TARGET are read
# too. A crash is saved in fuzz/cargo-fuzz/artifacts/TARGET; minimise it with
#   cargo fuzz tmin -s none --fuzz-dir fuzz/cargo-fuzz TARGET ARTIFACT
# and keep the minimised input in fuzz/seeds/TARGET as a regression.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

target="${1:-all}"
seconds="${2:-180}"
shift $(($# < 2 ? $# : 2))
[[ "${1:-}" == "--" ]] && shift
extra=("$@")

all=(codec proto guest_agent replica nbd vhost_blk control plan_file orchestrate)
if [[ "$target" == all ]]; then
    targets=("${all[@]}")
else
    found=0
    for t in "${all[@]}"; do [[ "$t" == "$target" ]] && found=1; done
    if [[ $found == 0 ]]; then
        echo "unknown target $target (known: ${all[*]})" >&2
        exit 2
    fi
    targets=("$target")
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    echo "== $t: ${seconds}s" >&2
    cargo fuzz run -s none --fuzz-dir fuzz/cargo-fuzz "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 "${extra[@]}"
done
