#!/usr/bin/env bash
# Run here (not on the GPU machine), from the root of the checkout the device calls send: copies
# what benchmarks/gpu/check.sh needs there and cannot download into .gpu_carry/ (ignored by git
# through .git/info/exclude): GoogleTest's source, for a machine without a system GoogleTest.
# Then name `.gpu_carry` in the device call's carry.
set -euo pipefail
[ -f CMakeLists.txt ] && [ -d csrc ] || { echo "run it from the repository root" >&2; exit 2; }
SRC=${GTEST_SRC:-/usr/src/googletest}
[ -f "$SRC/CMakeLists.txt" ] || { echo "no GoogleTest source at $SRC (apt-get install googletest, or set GTEST_SRC)" >&2; exit 1; }
EXCLUDE=$(git rev-parse --git-path info/exclude)
grep -qx '/.gpu_carry/' "$EXCLUDE" 2>/dev/null || echo '/.gpu_carry/' >>"$EXCLUDE"
rm -rf .gpu_carry/googletest && mkdir -p .gpu_carry
cp -r "$SRC" .gpu_carry/googletest
echo "copied $SRC to .gpu_carry/googletest ($(du -sh .gpu_carry | cut -f1)); carry .gpu_carry"
