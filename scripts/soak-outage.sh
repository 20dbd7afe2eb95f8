#!/usr/bin/env bash
# Soak outside CI: a real source and destination through the WAN emulator, the link cut in
# mid-postcopy for FAULTLINE_SOAK_CUT_S seconds (default 600: ten minutes), then restored.
# The session must resume and complete with equal digests of all memory on both sides.
#
#   scripts/soak-outage.sh            # a 10 minute outage (about 11 minutes in all)
#   scripts/soak-outage.sh 1800       # half an hour
set -euo pipefail
cd "$(dirname "$0")/.."
export FAULTLINE_SOAK_CUT_S="${1:-${FAULTLINE_SOAK_CUT_S:-600}}"
echo "soak: a ${FAULTLINE_SOAK_CUT_S} s outage in mid-postcopy" >&2
exec cargo test -p faultline-tests --test recovery -- --ignored --nocapture a_long_outage_soak
