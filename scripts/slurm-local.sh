#!/usr/bin/env bash
# Runs a small comparison as a Slurm job array on a one-node Slurm cluster
# started on this machine, then merges the shard records with `zhijian report`
# and checks that every run of the grid is there exactly once.
#
# Not part of CI: it installs Debian packages (slurm-wlm, munge), and starts
# munged, slurmctld and slurmd as root; it stops the daemons it started when it
# ends. Debian bookworm, as root:
#
#   scripts/slurm-local.sh 2>&1 | tee docs/slurm/slurm-local-output.txt
#
# ZHIJIAN_BIN=path/to/zhijian skips the release build (which takes several
# minutes on 2 cores the first time); KEEP=1 keeps the work folder.
# The cluster needs no cgroups: processes are tracked by parent id
# (proctrack/linuxproc), tasks are not bound (task/none), nothing is accounted.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
t0=$(date +%s)
log() { printf '[slurm-local %4ds] %s\n' $(($(date +%s) - t0)) "$*"; }
fail() {
    log "FAILED: $*"
    exit 1
}

[ "$(id -u)" = 0 ] || fail "run as root (it installs packages and starts the Slurm daemons)"

log "installing slurm-wlm and munge (apt-get)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq slurm-wlm munge | tail -n 3
log "installed: $(dpkg-query -W -f='${Package} ${Version}  ' slurm-wlm slurmctld slurmd munge)"

work=$(mktemp -d /tmp/zhijian-slurm.XXXXXX)
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(free -m | awk '/^Mem:/ { print $2 }')
started_munged=""

# Whether process $1 still runs (a zombie left for a parent that never reaps it does not).
running() { [ -r "/proc/$1/stat" ] && [ "$(cut -d ' ' -f 3 "/proc/$1/stat")" != Z ]; }

stop_daemons() {
    local rc=$?
    set +e
    # Only the daemons this script started, by their pid files; each is waited
    # for (slurmctld saves its state as it stops).
    for pidfile in "$work/run/slurmd.pid" "$work/run/slurmctld.pid" ${started_munged:+"$started_munged"}; do
        if [ -s "$pidfile" ]; then
            local pid
            pid=$(cat "$pidfile")
            kill "$pid" 2>/dev/null
            for _ in $(seq 100); do running "$pid" || break; sleep 0.1; done
            if running "$pid"; then log "$(basename "$pidfile" .pid) (pid $pid) still running"; else log "stopped $(basename "$pidfile" .pid) (pid $pid)"; fi
        fi
    done
    if [ -n "${KEEP:-}" ] || [ "$rc" != 0 ]; then
        log "work folder kept: $work"
    else
        rm -rf "$work" || log "could not remove $work"
    fi
    log "exit status $rc after $(($(date +%s) - t0)) s"
}
trap stop_daemons EXIT

log "munge: key and daemon"
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running"
else
    runuser -u munge -- /usr/sbin/munged
    started_munged=/run/munge/munged.pid
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
    munge -n | unmunge >/dev/null || fail "munged does not answer"
    log "munged started (pid $(cat /run/munge/munged.pid))"
fi

log "slurm.conf: one node $host, CPUs=$cpus, RealMemory=$mem_mb MB, state under $work"
mkdir -p "$work/etc" "$work/run" "$work/spool" "$work/state" "$work/log"
export SLURM_CONF="$work/etc/slurm.conf"
cat >"$SLURM_CONF" <<EOF
ClusterName=zhijian-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# No cgroups: track processes by parent id, do not bind tasks, account nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# CPUs are the consumable resource (memory is not), so tasks share the node.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldPidFile=$work/run/slurmctld.pid
SlurmdPidFile=$work/run/slurmd.pid
SlurmdSpoolDir=$work/spool
StateSaveLocation=$work/state
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

log "starting slurmctld and slurmd"
slurmctld -i || { cat "$work/log/slurmctld.log" 2>/dev/null; fail "slurmctld did not start"; }
slurmd || { cat "$work/log/slurmd.log" 2>/dev/null; fail "slurmd did not start"; }
state=""
for _ in $(seq 60); do
    state=$(sinfo -h -N -o '%t' 2>/dev/null | head -n 1 || true)
    [ "$state" = idle ] && break
    sleep 1
done
if [ "$state" != idle ]; then
    tail -n 30 "$work/log/slurmctld.log" "$work/log/slurmd.log" || true
    fail "the node is not idle after 60 s (state: ${state:-none})"
fi
sinfo

if [ -n "${ZHIJIAN_BIN:-}" ]; then
    bin=$(realpath "$ZHIJIAN_BIN")
    log "zhijian binary: $bin (ZHIJIAN_BIN)"
else
    log "building the release zhijian binary"
    (cd "$repo" && cargo build --release --bin zhijian)
    bin="$repo/target/release/zhijian"
fi
[ -x "$bin" ] || fail "no zhijian binary at $bin"

log "experiment: small_cnn on a generated image folder, 3 strategies x 2 seeds"
exp="$work/exp"
mkdir -p "$exp"
python3 - "$exp/imgs" <<'EOF'
# 28x28 RGB PNGs, a class each for a bright upper or lower half, with noise
# (the standard library only: no imaging package needed).
import os, random, struct, sys, zlib

def png(path, w, h, rows):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + r for r in rows)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))

rng = random.Random(7)
for cls, top in (("bright_top", True), ("bright_bottom", False)):
    os.makedirs(os.path.join(sys.argv[1], cls), exist_ok=True)
    for i in range(24):
        rows = []
        for y in range(28):
            base = 190 if (y < 14) == top else 40
            rows.append(bytes(v for _ in range(28) for v in [base + rng.randrange(64)] * 3))
        png(os.path.join(sys.argv[1], cls, f"{i:02}.png"), 28, 28, rows)
EOF
cat >"$exp/exp.toml" <<'EOF'
name = "slurm-local"
device = "cpu"
seeds = [0, 1]

[backbone]
kind = "small_cnn"
channels = [8, 16]

[data]
kind = "image_folder"
path = "imgs"
holdout = [0.25, 0.25]
augment = { scale = [1.0, 1.0], ratio = [1.0, 1.0], hflip = false }

[train]
epochs = 30
max_steps = 80
batch_size = 8
eval_batch_size = 32
lr = 1e-3
warmup_ratio = 0.0

[[strategy]]
name = "full"
methods = [{ method = "full_finetune" }]

[[strategy]]
name = "full-lr3e-3"
methods = [{ method = "full_finetune" }]
train = { lr = 3e-3 }

[[strategy]]
name = "probe"
methods = [{ method = "linear_probe" }]
train = { lr = 3e-2 }
EOF
runs=6
tasks=3
records="$exp/results/slurm-local.jsonl"

log "zhijian compare --slurm $tasks"
(cd "$exp" && "$bin" compare exp.toml --records results/slurm-local.jsonl --no-feature-cache \
    --slurm "$tasks" --slurm-cpus 1 --slurm-time 0:10:00)
script="$exp/results/slurm-local.sbatch"
[ -s "$script" ] || fail "no script at $script"
echo "----- $script -----"
cat "$script"
echo "-----"

log "sbatch"
job=$(sbatch --parsable "$script")
log "submitted job array $job"
deadline=$(($(date +%s) + 600))
while [ -n "$(squeue -h -j "$job" 2>/dev/null)" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { squeue; scancel "$job"; fail "the array did not finish within 600 s"; }
    squeue -h -j "$job" -o '  %i %t %M %R' | sort
    sleep 5
done
log "the array has finished"
for f in "$exp"/results/slurm-logs/*.out; do
    echo "----- $f: its runs -----"
    grep -E "seed [0-9]+: (test top-1|FAILED)" "$f" || { cat "$f"; fail "no finished run in $f"; }
done
echo "-----"
# slurmd tries every MPI plugin it has at start; this one-node cluster uses none (MpiDefault=none).
if grep "error" "$work/log/slurmd.log" | grep -v -e "pmix" -e "MPI:"; then
    log "(errors above from $work/log/slurmd.log)"
fi

log "merging the shard files with the command at the end of the script"
merge=$(tail -n 1 "$script" | sed 's/^# //')
echo "$merge"
eval "$merge"
[ -s "$records" ] || fail "no merged records at $records"

log "checking the merged records"
python3 - "$records" "$runs" <<'EOF'
import json, sys
records = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
keys = [r["key"] for r in records]
runs = sorted((r["strategy"], r["seed"]) for r in records)
print(f"{len(records)} records, {len(set(keys))} distinct keys: {runs}")
failed = [r for r in records if r.get("failed")]
assert len(records) == int(sys.argv[2]), f"expected {sys.argv[2]} records, found {len(records)}"
assert len(set(keys)) == len(keys), "a run is recorded twice"
assert len(set(runs)) == len(runs), "a strategy and seed is recorded twice"
assert not failed, f"failed runs: {failed}"
print("every run recorded exactly once")
EOF

log "merging again with shard 0 given twice: its records are dropped as duplicates"
"$bin" report "$records" "$exp/results/slurm-local.shard-0-of-3.jsonl" --out "$records" 2>"$work/again.err" >/dev/null
cat "$work/again.err"
grep -q "2 duplicate record(s) dropped" "$work/again.err" || fail "the 2 records of shard 0 were not reported as duplicates"
[ "$(wc -l <"$records")" = "$runs" ] || fail "merging duplicates changed the record count"
log "OK: $runs runs in $tasks Slurm tasks, merged into $records"
