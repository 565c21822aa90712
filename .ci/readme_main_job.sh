#!/usr/bin/env bash
# Fresh-venv check of the README's main-job command: clone the checkout into a temporary folder
# (so the virtual environment is new and nothing from the test run leaks in), run the README's
# second Quickstart command verbatim, then check the demo report has every method's row, every
# method x seed row and both validation sets' mean ± spread tables.
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
methods = ("gt_only", "replace_gt", "dual_l2", "dual_kl", "dual_kl_teacher")
missing = [m for m in ("teacher", "student_base", *methods) if f"| {m} |" not in text]
missing += [f"{m} seed {s}" for m in methods for s in (0, 1, 2) if f"| {m} | {s} |" not in text]
assert not missing, f"report.md lacks rows for {missing}"
for heading in ("Mean ± spread over seeds: `fine`", "Mean ± spread over seeds: `original`", "Reading the result"):
    assert heading in text, f"report.md lacks the section {heading!r}"
print("ci: report.md has every method's and every method x seed row")
PY
