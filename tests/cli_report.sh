#!/usr/bin/env bash
# cli_report.sh — tests of `dsmoe report` and `dsmoe study`'s front end: usage errors
# exit 2, bad folders and files exit 1 with a message naming them, the report of the
# synthetic study (tests/golden/study/, tests/ref/gen_study_golden.py): one HTML page
# without script or external reference, every chart inline and as a well-formed .svg
# file (python3 xml.etree), summary.json / summary.csv beside the runs, the same bytes
# when written twice, and a run folder reported alone.
#
#   bash tests/cli_report.sh <dsmoe-binary> <source-dir> <tmpdir>
source "$(dirname "$0")/clilib.sh" "$@"
PY=/usr/bin/python3

# ---------------------------------------------------------------- usage: 2 --
expect 0 "" -- "$DSMOE" report --help
grep -q -- "--layer" "$TMP/out.txt" || fail "report --help does not describe --layer"
expect 2 "which folder" -- "$DSMOE" report
expect 2 "unknown option '--bogus'" -- "$DSMOE" report "$TMP" --bogus
expect 2 "--layer" -- "$DSMOE" report "$TMP" --layer
expect 2 "--layer" -- "$DSMOE" report "$TMP" --layer -1
expect 2 "one folder only" -- "$DSMOE" report a b
expect 0 "" -- "$DSMOE" study --help
grep -q -- "--strategies" "$TMP/out.txt" || fail "study --help does not describe --strategies"
for f in --hidden-size --lr --warmup --data --domains --score --bias-rule --balance-loss --gamma \
    --corpus-tokens --eval-tokens --log-every; do
  grep -qF -- "$f" "$TMP/out.txt" || fail "study --help lacks dsmoe train's $f"
done
expect 2 "--out DIR is required" -- "$DSMOE" study
expect 2 "--seeds" -- "$DSMOE" study --out "$TMP/s" --seeds 0
expect 2 "--alpha" -- "$DSMOE" study --out "$TMP/s" --alpha 1e-3,x
expect 2 "--strategies" -- "$DSMOE" study --out "$TMP/s" --strategies v3,,aux-loss
expect 2 "--steps" -- "$DSMOE" study --out "$TMP/s" --steps 0
expect 2 "unknown option '--bogus'" -- "$DSMOE" study --out "$TMP/s" --bogus
expect 2 "--hidden-size expects an integer" -- "$DSMOE" study --out "$TMP/s" --hidden-size 0
expect 2 "--score expects sigmoid or softmax" -- "$DSMOE" study --out "$TMP/s" --score relu
expect 2 "--seed: the study sets each run's seeds" -- "$DSMOE" study --out "$TMP/s" --seed 4
expect 2 "--strategies" -- "$DSMOE" study --out "$TMP/s" --strategy v3
expect 2 "--top-k" -- "$DSMOE" study --out "$TMP/s" --preset tiny --top-k 9
[ -e "$TMP/s" ] && fail "a refused study created its folder"

# ------------------------------------- dsmoe train's flags reach every run --
# A tiny study of two strategies: the model, optimizer, routing and data flags given to
# the study are in each run's config (its metrics.jsonl "run" record), after the
# strategy's own settings; the warm-up stays within steps / 10 unless --warmup is given.
ST="--preset tiny --strategies v3,aux-loss --seeds 1 --threads 1 --quiet --corpus-tokens 60000 --eval-tokens 512"
expect 0 "" -- "$DSMOE" study $ST --steps 20 --hidden-size 48 --lr 0.002 --bias-rule proportional \
    --corpus-seed 7 --out "$TMP/flags"
expect 0 "" -- "$DSMOE" study $ST --steps 20 --warmup 7 --score softmax --out "$TMP/flags2"
$PY - "$TMP" <<'PYEOF' || fail "a study flag did not reach its runs"
import json, sys
def run(d, name):
    with open(f"{sys.argv[1]}/{d}/runs/{name}/metrics.jsonl") as f:
        r = json.loads(f.readline())
    assert r["type"] == "run", r
    return r
for name, kind in (("v3-seed1", "seq"), ("aux-loss-seed1", "expert")):
    r = run("flags", name)
    assert r["model"]["hidden_size"] == 48, (name, r["model"]["hidden_size"])
    assert abs(r["optimizer"]["lr"] - 0.002) < 1e-9, (name, r["optimizer"])
    assert r["optimizer"]["warmup_steps"] <= 2 and r["optimizer"]["total_steps"] == 20, r["optimizer"]
    assert r["balancer"]["rule"] == "proportional", r["balancer"]
    assert r["balance_loss"]["kind"] == kind, r["balance_loss"]   # the strategy's, kept
    assert r["corpus"]["seed"] == 7, r["corpus"]
    r = run("flags2", name)
    assert r["optimizer"]["warmup_steps"] == 7, r["optimizer"]
    assert r["model"]["scoring_func"] == "softmax", r["model"]["scoring_func"]
PYEOF

# ---------------------------------------------------------- bad input: 1 --
expect 1 "$TMP/none" -- "$DSMOE" report "$TMP/none"
mkdir -p "$TMP/bad/runs/r-seed1"
printf '{"type":"run","strategy":"v3"}\n' >"$TMP/bad/runs/r-seed1/metrics.jsonl"
expect 1 "metrics.jsonl line 1: field 'experts': missing" -- "$DSMOE" report "$TMP/bad"
[ -e "$TMP/bad/report.html" ] && fail "a failed report wrote report.html"

# ------------------------------------------------------- the study report --
cp -r "$SRC/tests/golden/study" "$TMP/study"
expect 0 "" -- "$DSMOE" report "$TMP/study"
[ "$(cat "$TMP/out.txt")" = "$TMP/study/report.html" ] || fail "report printed '$(cat "$TMP/out.txt")'"
H=$TMP/study/report.html
for f in loss.svg maxvio.svg topweight.svg load-0-v3.svg load-1-aux-loss.svg domains-0-v3.svg \
         domains-1-aux-loss.svg summary.json summary.csv; do
  [ -s "$TMP/study/$f" ] || fail "no $f"
done
[ "$(grep -c '<figure class="chart"' "$H")" = 7 ] || fail "report.html lacks its 7 charts"
[ "$(grep -c '<svg ' "$H")" = 7 ] || fail "report.html lacks its 7 inline SVG"
grep -qi '<script' "$H" && fail "report.html has a script"
grep -qiE '(src|href)="?(http|//)' "$H" && fail "report.html references the network"
grep -q 'class="diff"' "$H" || fail "the summary table marks no difference as outside the seed spread"
grep -q 'class="ns"' "$H" || fail "the summary table marks no difference as within the seed spread"
$PY - "$TMP/study" <<'PYEOF' || fail "SVG / summary checks"
import csv, glob, json, re, sys, xml.etree.ElementTree as ET
d = sys.argv[1]
svgs = sorted(glob.glob(d + "/*.svg"))
assert len(svgs) == 7, svgs
for f in svgs:
    root = ET.parse(f).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg", (f, root.tag)
    assert len(list(root.iter())) > 20, f
html = open(d + "/report.html", encoding="utf-8").read()
# the inline copies are the files' bytes, and each parses as XML
for m in re.finditer(r"<svg .*?</svg>\n", html, re.S):
    ET.fromstring(m.group(0))
for f in svgs:
    assert open(f, encoding="utf-8").read() in html, f
s = json.load(open(d + "/summary.json"))
# the strategies in their documented order (v3 first), then seeds by number
assert [r["name"] for r in s["runs"]] == ["v3-seed1", "v3-seed2", "aux-loss-seed1", "aux-loss-seed2"]
assert s["reference"] == "v3"
rows = list(csv.DictReader(open(d + "/summary.csv")))
assert [r["kind"] for r in rows] == ["run"] * 4 + ["mean", "std", "min", "max"] * 2, rows
for r, j in zip(rows, s["runs"]):
    for k, v in j["metrics"].items():
        assert (v is None and r[k] == "") or abs(float(r[k]) - v) <= 1e-9 * max(1, abs(v)), (k, r[k], v)
PYEOF
cp "$H" "$TMP/first.html"
expect 0 "" -- "$DSMOE" report "$TMP/study"
cmp -s "$H" "$TMP/first.html" || fail "the report differs when written twice"

# --html, --svg-dir, --layer
mkdir -p "$TMP/out"
expect 0 "" -- "$DSMOE" report "$TMP/study" --html "$TMP/out/page.html" --svg-dir "$TMP/out" --layer 2
[ -s "$TMP/out/page.html" ] && [ -s "$TMP/out/loss.svg" ] || fail "--html / --svg-dir not honoured"
grep -q "layer 2:" "$TMP/out/page.html" || fail "--layer 2 not shown"
expect 2 "--layer 4 is not a main MoE layer" -- "$DSMOE" report "$TMP/study" --layer 4

# a run folder alone
expect 0 "" -- "$DSMOE" report "$TMP/study/runs/v3-seed2"
[ "$(grep -c '<figure class="chart"' "$TMP/study/runs/v3-seed2/report.html")" = 5 ] || fail "a run's report lacks its 5 charts"

if [ "$fails" -ne 0 ]; then
  echo "cli_report: $fails failure(s)" >&2
  exit 1
fi
echo "cli_report: all passed"
