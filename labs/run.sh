#!/usr/bin/env bash
# Runs lab N as written: every line of its ```bash blocks that starts with `python ` (one command
# per line), from the repository root or from DIR, printing each command's wall time and the lab's
# total; stops at the first failing command with its exit status. ```text blocks are never run.
#
#   bash labs/run.sh N [--offline] [DIR]
#
# The data (labs/README.md): the sheets train on CIFAR-10-LT (`--dataset cifar10-lt`), downloaded
# once into ./data (about 170 MB). DATA= chooses other data for every command of the lab:
#   DATA=cifar10-lt           the sheets as written (the default)
#   DATA=synthetic-lt         the offline path, also `--offline`: generated textures, no files; the
#                             commands' --n-max is dropped (synthetic-lt's own 500 images per class)
#   DATA=/path/to/tree        a copy of CIFAR-10 as an ImageFolder tree (the JPEG copy,
#                             docs/data.md): --dataset folder --data-dir /path/to/tree
#                             --imb-ratio 100
# SEED=S runs the lab with another seed: --seed S on every training command, outputs under
# runs/labN-seedS/ (the instructor's notes give ranges over SEED=1 and SEED=2)
set -u
labs="$(cd "$(dirname "$0")" && pwd)"
n="${1:?usage: bash labs/run.sh N [--offline] [DIR]}"
shift
data="${DATA:-cifar10-lt}"
dir="$labs/.."
for a in "$@"; do
    case "$a" in
        --offline) data="synthetic-lt" ;;
        *) dir="$a" ;;
    esac
done
case "$data" in
    cifar10-lt|synthetic-lt) ;;
    *) data="$(cd "$data" 2>/dev/null && pwd)" || { echo "run.sh: DATA: no folder $DATA" >&2
                                                   exit 2; } ;;
esac
sheet=$(ls "$labs/$n"-*.md 2>/dev/null | head -n 1)
[ -n "$sheet" ] || { echo "run.sh: no lab $n (labs/$n-*.md)" >&2; exit 2; }
cd "$dir" || exit 2
export MPLBACKEND="${MPLBACKEND:-Agg}"
# bash-block lines: a command starts with `python `; blank lines and # comments are allowed
cmds=$(awk '/^```bash/ {b = 1; next} /^```/ {b = 0} b && !/^[[:space:]]*(#|$)/' "$sheet")
bad=$(grep -v '^python ' <<< "$cmds")
[ -z "$bad" ] || { echo "run.sh: $sheet: a bash-block line that is not one python command: $bad" >&2
                   exit 2; }
[ -n "$cmds" ] || { echo "run.sh: $sheet has no commands" >&2; exit 2; }
case "$data" in
    cifar10-lt) ;;
    synthetic-lt)
        swap='s/--dataset cifar10-lt/--dataset synthetic-lt/g; s/ --n-max [0-9]+//g'
        cmds=$(sed -E "$swap" <<< "$cmds") ;;
    *)
        [ -d "$data/train" ] || { echo "run.sh: DATA=$data: no $data/train (a CIFAR-10 tree)" >&2
                                  exit 2; }
        cmds=$(sed -E "s#--dataset cifar10-lt#--dataset folder --data-dir $data --imb-ratio 100#g" \
               <<< "$cmds") ;;
esac
seed="${SEED:-}"
if [ -n "$seed" ]; then
    [[ "$seed" =~ ^[0-9]+$ ]] || { echo "run.sh: SEED=$seed is not a number" >&2; exit 2; }
    # every training command gets --seed, and runs/labN/ becomes runs/labN-seedS/ everywhere
    add="/^python (fassl|tase|dscl|hybrid)\.py /s/\$/ --seed $seed/"
    cmds=$(sed -E "$add; s#runs/lab$n/#runs/lab$n-seed$seed/#g" <<< "$cmds")
fi
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
total=$(awk -v a="$t_lab" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}')
echo "=== lab $n: $k commands, total $total s" \
     "(data $data, seed ${seed:-as written}, LAB_SCALE=${LAB_SCALE:-1}," \
     "$(nproc 2>/dev/null || echo '?') CPUs)"
