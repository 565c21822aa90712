#!/usr/bin/env bash
# Fresh-venv check of the README's main-job command: clone the checkout into a temporary folder
# (so the virtual environment is new and nothing from the test run leaks in), run the README's
# second Quickstart command verbatim, then check the demo report has every method's row.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/repo" || exit 1
cd "$work/repo"
cmd="$(python3 - <<'PY'
import re
text = open("README.md").read()
section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
lines = [l for b in blocks for l in b.splitlines() if l and not l.startswith("#")]
print(lines[1])
PY
)"
echo "ci: README main job: $cmd"
started=$(date +%s)
bash -c "$cmd" || { echo "ci: the README main job failed" >&2; exit 1; }
echo "ci: README main job finished in $(( $(date +%s) - started )) s"
python3 - <<'PY' || exit 1
from pathlib import Path
report = Path("demo_out/report.md")
assert report.is_file(), "demo_out/report.md is missing"
text = report.read_text()
missing = [m for m in ("teacher", "student_base", "gt_only", "replace_gt", "dual_l2", "dual_kl") if f"| {m} |" not in text]
assert not missing, f"report.md lacks rows for {missing}"
print("ci: report.md has every method's row")
PY
