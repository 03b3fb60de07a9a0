# clilib.sh — shared by the CLI tests (sourced, not run): arguments, a fresh scratch
# folder, failure counting, the exit-code-and-message check and .npy readers.
#   source "$(dirname "$0")/clilib.sh" "$@"     # sets DSMOE, SRC, TMP; empties TMP
DSMOE=$1
SRC=$2
TMP=$3
rm -rf "$TMP"
mkdir -p "$TMP"
fails=0
fail() { echo "FAIL: $*" >&2; fails=$((fails + 1)); }

# expect CODE NEEDLE -- command...: exit code and a message fragment on stderr
expect() {
    local code=$1 needle=$2
    shift 3
    "$@" >"$TMP/out.txt" 2>"$TMP/err.txt"
    local rc=$?
    if [ "$rc" != "$code" ]; then
        fail "exit $rc (want $code): $*"
        cat "$TMP/err.txt" >&2
    elif [ -n "$needle" ] && ! grep -qF -- "$needle" "$TMP/err.txt"; then
        fail "stderr lacks '$needle': $*"
        cat "$TMP/err.txt" >&2
    fi
}

# data bytes of a .npy, version 1 (everything after the header)
npy_data() {
    local h=$(($(od -An -tu2 -j8 -N2 "$1" | tr -d ' ') + 10))
    tail -c +$((h + 1)) "$1"
}
# values of a .npy as text, one a line: npy_values FILE f4|f8|d4
npy_values() { npy_data "$1" | od -An -v -t"$2" -w"${2#?}" | tr -d ' '; }
