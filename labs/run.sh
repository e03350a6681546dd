#!/usr/bin/env bash
# Runs lab N as written: every line of its ```bash blocks that starts with `python ` (one command per line),
# from the repository root or from DIR, printing each command's wall time and the lab's total; stops at the
# first failing command with its exit status. ```text blocks are never run. Usage (labs/README.md):
#   bash labs/run.sh N [DIR]          e.g. LAB_SCALE=0.2 bash labs/run.sh 1 /tmp/lab-check
set -u
labs="$(cd "$(dirname "$0")" && pwd)"
n="${1:?usage: bash labs/run.sh N [DIR]}"
sheet=$(ls "$labs/$n"-*.md 2>/dev/null | head -n 1)
[ -n "$sheet" ] || { echo "run.sh: no lab $n (labs/$n-*.md)" >&2; exit 2; }
cd "${2:-$labs/..}" || exit 2
export MPLBACKEND="${MPLBACKEND:-Agg}"
# bash-block lines: a command starts with `python `; blank lines and # comments are allowed, nothing else
cmds=$(awk '/^```bash/ {b = 1; next} /^```/ {b = 0} b && !/^[[:space:]]*(#|$)/' "$sheet")
bad=$(grep -v '^python ' <<< "$cmds")
[ -z "$bad" ] || { echo "run.sh: $sheet: a bash-block line that is not one python command: $bad" >&2; exit 2; }
[ -n "$cmds" ] || { echo "run.sh: $sheet has no commands" >&2; exit 2; }
now() { date +%s.%N; }
t_lab=$(now)
k=0
while IFS= read -r cmd; do
    k=$((k + 1))
    echo "=== [lab $n, command $k] $cmd"
    t0=$(now)
    bash -c "$cmd" < /dev/null
    rc=$?
    dt=$(awk -v a="$t0" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}')
    if [ "$rc" -ne 0 ]; then
        echo "=== FAILED (exit $rc after ${dt} s): $cmd" >&2
        exit "$rc"
    fi
    echo "=== ${dt} s: $cmd"
done <<< "$cmds"
echo "=== lab $n: $k commands, total $(awk -v a="$t_lab" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}') s" \
     "(LAB_SCALE=${LAB_SCALE:-1}, $(nproc 2>/dev/null || echo '?') CPUs)"
