#!/usr/bin/env bash
# Fetches the page's two third-party libraries at pinned versions from the npm registry and
# copies their browser builds and licences into static/vendor/, which the binary embeds.
# Run it by hand to update them (then rerun the e2e tests and commit the files); nothing is
# fetched at build or run time.
#
#   scripts/vendor-page-libs.sh
#
# To move to a new version: change VERSION and INTEGRITY below (`npm view marked@X dist.integrity`),
# read the library's changelog for changes to the API the page uses (marked.parse with
# gfm/breaks; DOMPurify.sanitize and its afterSanitizeAttributes hook), run this script.
# npm checks each tarball against the pinned integrity; a mismatch stops the script.
set -euo pipefail
cd "$(dirname "$0")/.."

MARKED_VERSION=18.2.1
MARKED_INTEGRITY=sha512-ii4bxCTCqqwpT86XZWgJNs+ZnAIZksmLGYMViWA7PDIXYIeNo1x6cDdX3JOip9NM/cI6p8z57FxliACboTruMA==
DOMPURIFY_VERSION=3.5.0
DOMPURIFY_INTEGRITY=sha512-LYC0ZkE8P1V42JsRYTwMdme/2ET8SpOc5AA2eOFjP/IadvRd2fwiT4TVz5vkfy0XUx12aS2UaRkTnfVPNOv9vw==

OUT=static/vendor
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# fetch NAME VERSION INTEGRITY: the package's tarball, unpacked into $WORK/NAME.
fetch() {
  local name="$1" version="$2" integrity="$3" got
  got="$(cd "$WORK" && npm pack "$name@$version" --json --silent | node -e '
    let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => {
      const [p] = JSON.parse(s); console.log(p.integrity + " " + p.filename); });')"
  if [ "${got%% *}" != "$integrity" ]; then
    echo "$name@$version: integrity ${got%% *} is not the pinned $integrity" >&2
    exit 1
  fi
  mkdir -p "$WORK/$name"
  tar xzf "$WORK/${got#* }" -C "$WORK/$name" --strip-components=1
}

fetch marked "$MARKED_VERSION" "$MARKED_INTEGRITY"
fetch dompurify "$DOMPURIFY_VERSION" "$DOMPURIFY_INTEGRITY"

mkdir -p "$OUT"
# The source maps are not shipped, so the lines pointing at them go (a browser's developer
# tools would otherwise ask the service for a file it does not have).
sed '/^\/\/# sourceMappingURL=/d' "$WORK/marked/lib/marked.umd.js" > "$OUT/marked.umd.js"
sed '/^\/\/# sourceMappingURL=/d' "$WORK/dompurify/dist/purify.min.js" > "$OUT/purify.min.js"
cp "$WORK/marked/LICENSE" "$OUT/marked.LICENSE"
cp "$WORK/dompurify/LICENSE" "$OUT/dompurify.LICENSE"
# DOMPurify is dual-licensed; the Mozilla licence text is a file of its own.
cp "$WORK/dompurify/LICENSE-MPL" "$OUT/dompurify.LICENSE-MPL"

cat > "$OUT/VERSIONS" <<VERSIONS
# Written by scripts/vendor-page-libs.sh; do not edit by hand.
marked $MARKED_VERSION $MARKED_INTEGRITY lib/marked.umd.js MIT
dompurify $DOMPURIFY_VERSION $DOMPURIFY_INTEGRITY dist/purify.min.js MPL-2.0 OR Apache-2.0
VERSIONS
echo "static/vendor: marked $MARKED_VERSION, dompurify $DOMPURIFY_VERSION"
