#!/usr/bin/env bash
# A whole dispatcher on one machine: the stand-in controller (`dispatch-sim controller`),
# `arvados-dispatch-cloud serve` with the loopback driver (each "instance" is an SSH server on
# 127.0.0.1), and the stand-in crunch-run, deployed through DeployRunnerBinary. It runs a small
# workload to completion and exits 0.
#
#   scripts/local-demo.sh                  run the workload, then stop everything
#   scripts/local-demo.sh --keep-running   stay up after the workload, until Ctrl-C, so you can try
#                                          curl -H "Authorization: Bearer xyzzy" http://127.0.0.1:9006/metrics
#                                          arvados-dispatch-cloud instance list -header --config <printed path>
#
# The management API listens on 127.0.0.1:9006 with ManagementToken `xyzzy`. Nothing connects
# anywhere but 127.0.0.1. See docs/local-demo.md.
set -euo pipefail
cd "$(dirname "$0")/.."

KEEP=0
case "${1:-}" in
    --keep-running) KEEP=1 ;;
    "") ;;
    *) echo "usage: $0 [--keep-running]" >&2; exit 2 ;;
esac

MGMT=127.0.0.1:9006
TOKEN=localdemosystemroottoken0123456789abc
CONTAINERS=${DEMO_CONTAINERS:-6}

if (exec 3<>/dev/tcp/127.0.0.1/9006) 2>/dev/null; then
    echo "local-demo: 127.0.0.1:9006 is already in use; stop whatever listens there first" >&2
    exit 1
fi
command -v ssh-keygen >/dev/null || { echo "local-demo: ssh-keygen is missing (apt-get install openssh-client)" >&2; exit 1; }

echo "== building (debug)"
cargo build --quiet --bins -p arvados-dispatch-cloud -p dispatch-sim
BIN="${CARGO_TARGET_DIR:-target}/debug"
BIN="$(cd "$BIN" && pwd)"

WORK="$(mktemp -d /tmp/adc-local-demo.XXXXXX)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    # Stand-in crunch-run processes still running (only if interrupted mid-workload).
    pkill -TERM -f "crunch-run~.* -no-detach" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ssh-keygen -q -t ed25519 -N '' -f "$WORK/dispatch_key"
mkdir -p "$WORK/locks"
{
    echo "cluster_id: zzzzz"
    echo "containers:"
    for i in $(seq 1 "$CONTAINERS"); do
        echo "  - {vcpus: 1, ram: 268435456, run_seconds: $((2 + i % 4))}"
    done
} >"$WORK/workload.yaml"

echo "== starting the stand-in controller"
ARVADOS_API_TOKEN=$TOKEN "$BIN/dispatch-sim" controller --listen 127.0.0.1:0 --quiet \
    --workload "$WORK/workload.yaml" >"$WORK/controller.out" 2>"$WORK/controller.log" &
PIDS+=($!)
for _ in $(seq 1 100); do
    grep -q "listening on" "$WORK/controller.out" 2>/dev/null && break
    sleep 0.1
done
CTL=$(sed -n 's/^listening on //p' "$WORK/controller.out")
[ -n "$CTL" ] || { echo "local-demo: the stand-in controller did not start" >&2; cat "$WORK/controller.log" >&2; exit 1; }
echo "   controller at http://$CTL ($CONTAINERS containers queued)"

cat >"$WORK/config.yml" <<EOF
Clusters:
  zzzzz:
    SystemRootToken: $TOKEN
    ManagementToken: xyzzy
    Services:
      Controller:
        ExternalURL: http://$CTL
      DispatchCloud:
        InternalURLs:
          "http://$MGMT": {}
    Containers:
      DispatchPrivateKey: file://$WORK/dispatch_key
      CloudVMs:
        Driver: loopback
        DriverParameters:
          MaxInstances: 1
          StateFile: $WORK/loopback-state.json
        ImageID: loopback
        BootProbeCommand: "true"
        DeployRunnerBinary: $BIN/crunch-run-standin
        DeployRunnerDirectory: $WORK/runner
        PollInterval: 1s
        SyncInterval: 2s
        ProbeInterval: 1s
        TimeoutIdle: 10s
    InstanceTypes:
      local4:
        ProviderType: localhost
        VCPUs: 4
        RAM: 4GiB
        IncludedScratch: 10GB
        Price: 0.1
EOF
"$BIN/arvados-dispatch-cloud" check-config --config "$WORK/config.yml" >/dev/null 2>"$WORK/check-config.err" || {
    cat "$WORK/check-config.err" >&2; exit 1; }

echo "== starting arvados-dispatch-cloud serve (loopback driver; management API on $MGMT)"
CRUNCH_RUN_STANDIN_DIR="$WORK/locks" "$BIN/arvados-dispatch-cloud" serve --config "$WORK/config.yml" \
    2>"$WORK/dispatcher.log" &
PIDS+=($!)

status() { curl -s "http://$CTL/_standin/status" || true; }
deadline=$((SECONDS + 180))
while :; do
    s=$(status)
    line=$(python3 -c 'import json,sys
try:
    d=json.loads(sys.argv[1]); c=d["counts"]
    print("   queued %d  locked %d  running %d  complete %d  cancelled %d%s" % (c["Queued"], c["Locked"], c["Running"], c["Complete"], c["Cancelled"], "  (done)" if d["all_finished"] else ""))
except Exception:
    print("   waiting for the controller")' "$s")
    echo "$line"
    case "$line" in *"(done)"*) break ;; esac
    if [ $SECONDS -ge $deadline ]; then
        echo "local-demo: the workload did not finish within 180 s; dispatcher log: $WORK/dispatcher.log" >&2
        exit 1
    fi
    sleep 2
done

echo "== instances (arvados-dispatch-cloud instance list -header)"
"$BIN/arvados-dispatch-cloud" instance list -header --config "$WORK/config.yml" || true
echo "== a few metrics"
curl -s -H "Authorization: Bearer xyzzy" "http://$MGMT/metrics" | grep -E '^arvados_dispatchcloud_(containers_running|instances_total|boot_outcomes)' | head -8 || true

failed=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(sum(1 for c in d["containers"].values() if c["state"]!="Complete" or c["running_entries"]!=1))' "$(status)")
if [ "$failed" != 0 ]; then
    echo "local-demo: $failed containers did not complete exactly once" >&2
    exit 1
fi
echo "== all $CONTAINERS containers completed exactly once"

if [ $KEEP = 1 ]; then
    cat <<EOF

The dispatcher keeps running (Ctrl-C stops everything). Try:
  curl -H "Authorization: Bearer xyzzy" http://$MGMT/metrics
  curl -H "Authorization: Bearer xyzzy" http://$MGMT/arvados/v1/dispatch/instances
  $BIN/arvados-dispatch-cloud instance list -header --config $WORK/config.yml
Logs: $WORK/dispatcher.log
EOF
    wait "${PIDS[1]}"
fi
exit 0
