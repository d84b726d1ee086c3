#!/usr/bin/env bash
# Screenshot of Snakemake's HTML report in headless Chromium (Debian: apt-get install -y chromium), opened on
# one result: its caption in the side panel and the result itself beside it.
#   bash scripts/report_screenshot.sh [REPORT] [PNG] [RESULT]
# (defaults: results/report.html docs/report.png main.html).
# The report is a single-page app with no URLs per view: a copy of it gets a script that opens RESULT (a file
# name in the report, e.g. main.html, kept_tokens.png).
set -euo pipefail
report=${1:-results/report.html}
png=${2:-docs/report.png}
result=${3:-main.html}
command -v chromium >/dev/null || { echo "needs chromium (Debian: apt-get install -y chromium)" >&2; exit 1; }
grep -q "\"name\": \"$result\"" "$report" || { echo "$report has no result named $result" >&2; exit 1; }
page=$(mktemp --suffix=.html)
trap 'rm -f "$page"' EXIT
{
    cat "$report"   # what follows </html> still runs, in the page's body
    cat <<JS
<style>.h-screen { height: 100% } html, body, #app, #app > div { height: 100% }</style>
<script>
setTimeout(function () {
    const path = Object.keys(results).find(p => results[p].name === "$result");
    const category = Object.keys(categories).find(c => Object.values(categories[c]).some(ps => ps.includes(path)));
    const content = results[path].mime_type === "text/html" ? "html" : "img";
    app.setView({navbarMode: "resultinfo", category: category, resultPath: path, content: content,
                 contentPath: results[path].data_uri});
}, 300);
</script>
JS
} > "$page"
mkdir -p "$(dirname "$png")"
rm -f "$png"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,720 \
    --virtual-time-budget=10000 --screenshot="$png" "file://$page" 2>/dev/null
[ -s "$png" ] || { echo "chromium wrote no $png" >&2; exit 1; }
echo "$png: $result of $report"
