#!/usr/bin/env bash
# report_chromium.sh — renders the report of the synthetic study (tests/golden/study/)
# in headless Chromium, takes a screenshot and checks that every chart is on it and drawn
# (tests/ref/png_regions.py: each chart's region has lines or cells in colour, not only
# axes), and the summary table after them. Exits 77 (ctest: skipped) where chromium or
# python3 with NumPy is missing (scripts/install-deps.sh installs them).
#
#   bash tests/report_chromium.sh <dsmoe-binary> <source-dir> <tmpdir>
set -u
DSMOE=$1
SRC=$2
TMP=$3
PY=/usr/bin/python3
CHROMIUM=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$CHROMIUM" ]; then
  echo "report_chromium: no chromium (scripts/install-deps.sh installs it): skipped"
  exit 77
fi
if ! $PY -c "import numpy" 2>/dev/null; then
  echo "report_chromium: no python3 NumPy: skipped"
  exit 77
fi
rm -rf "$TMP"
mkdir -p "$TMP"
cp -r "$SRC/tests/golden/study" "$TMP/study"
"$DSMOE" report "$TMP/study" >/dev/null || { echo "FAIL: dsmoe report" >&2; exit 1; }
H=$TMP/study/report.html
N=$(grep -c '<figure class="chart"' "$H")
[ "$N" -ge 5 ] || { echo "FAIL: $N charts" >&2; exit 1; }
# the layout of src/study/report.c: a 120 px header, then one figure every 420 px,
# each chart 760 x 360
HEADER=120 FIG=420 CW=760 CH=360
HEIGHT=$((HEADER + N * FIG + 300))
start=$(date +%s.%N)
timeout 180 "$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
  --user-data-dir="$TMP/profile" --window-size=800,$HEIGHT --screenshot="$TMP/shot.png" \
  "file://$H" >"$TMP/chromium.log" 2>&1
rc=$?
end=$(date +%s.%N)
echo "report_chromium: screenshot in $(echo "$end - $start" | bc 2>/dev/null || echo "?") s (exit $rc)"
if [ $rc -ne 0 ] || [ ! -s "$TMP/shot.png" ]; then
  echo "FAIL: chromium wrote no screenshot (exit $rc)" >&2
  tail -5 "$TMP/chromium.log" >&2
  exit 1
fi
$PY "$SRC/tests/ref/png_regions.py" "$TMP/shot.png" "$N" $HEADER $FIG $CW $CH || {
  echo "FAIL: a chart is missing or blank on the screenshot ($TMP/shot.png)" >&2
  exit 1
}
echo "report_chromium: all $N charts drawn"
