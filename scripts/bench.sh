#!/usr/bin/env bash
# Load benchmark of session-proxy against nginx, plus the memory store's cost per session.
#
#   scripts/bench.sh
#
# Builds the release binary and two examples (the upstream `bench_upstream` and
# `memory_per_session`), starts the upstream, redis-server and nginx (when it can be
# installed) on free loopback ports in a temporary directory, drives every scenario with
# wrk over keep-alive connections, and writes:
#   docs/benchmarks/results.md     the table, memory figures, targets, machine
#   docs/benchmarks/throughput.png req/s and p99 per scenario (needs matplotlib; installed
#                                  with pip when missing, skipped if that fails)
#   docs/benchmarks.md             its "Latest results" section, replaced in place
#
# Environment (all optional):
#   BENCH_ROUNDS=3        rounds; each runs every scenario once, and the report gives
#                         each figure's median over the rounds (a shared machine's bursts
#                         of slowness then spoil one round, not the result)
#   BENCH_DURATION=5      seconds of measured load per scenario and round
#   BENCH_WARMUP=1        seconds of unmeasured load before each measurement
#   BENCH_CONNECTIONS=64  wrk keep-alive connections
#   BENCH_THREADS=2       wrk threads
#   BENCH_SESSIONS=1000000 sessions for the memory-per-session measurement
#   BENCH_KEEP=1          keep the temporary directory (configs, logs, wrk output)
# Takes about 6 minutes with the defaults once the release build is done.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

ROUNDS=${BENCH_ROUNDS:-3}
DURATION=${BENCH_DURATION:-5}
WARMUP=${BENCH_WARMUP:-1}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
THREADS=${BENCH_THREADS:-2}
SESSIONS=${BENCH_SESSIONS:-1000000}

log() { echo "bench: $*" >&2; }

# --- tools --------------------------------------------------------------------------
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_updated=""
apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 1
  if [ -z "$apt_updated" ]; then
    $sudo apt-get update -qq >/dev/null 2>&1 || true
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1
}
need() { # need COMMAND DEBIAN-PACKAGE
  command -v "$1" >/dev/null 2>&1 && return 0
  log "installing $2 (Debian package)…"
  apt_install "$2" || { log "cannot install $2; install it and run again"; exit 1; }
}
need wrk wrk
need redis-server redis-server
need python3 python3
if ! python3 -c 'import matplotlib' >/dev/null 2>&1; then
  log "installing matplotlib for the chart (pip, else Debian package python3-matplotlib)…"
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet matplotlib >/dev/null 2>&1 ||
    apt_install python3-matplotlib ||
    log "matplotlib is not available: docs/benchmarks/throughput.png will not be written"
fi
NGINX=$(command -v nginx || true)
[ -n "$NGINX" ] || [ ! -x /usr/sbin/nginx ] || NGINX=/usr/sbin/nginx
if [ -z "$NGINX" ]; then
  log "installing nginx (Debian package nginx-light, else nginx)…"
  apt_install nginx-light || apt_install nginx || true
  NGINX=$(command -v nginx || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true)
  [ -n "$NGINX" ] || log "nginx is not available: the nginx reference and the ratios are skipped"
fi

# --- build --------------------------------------------------------------------------
log "building release (session-proxy, examples bench_upstream and memory_per_session)…"
cargo build --release --locked --quiet --bin session-proxy \
  --example bench_upstream --example memory_per_session
PROXY_BIN=$ROOT/target/release/session-proxy
UPSTREAM_BIN=$ROOT/target/release/examples/bench_upstream
MEMORY_BIN=$ROOT/target/release/examples/memory_per_session

# --- processes ----------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/session-proxy-bench.XXXXXX")
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  if [ "${BENCH_KEEP:-}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() { # wait_port PORT PID
  local i
  for i in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    kill -0 "$2" 2>/dev/null || { log "process $2 exited before listening on $1"; return 1; }
    sleep 0.1
  done
  log "nothing listens on port $1 after 10 s"
  return 1
}

stop() { # stop PID: SIGTERM, then wait
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  local kept=()
  for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || kept+=("$p"); done
  PIDS=("${kept[@]}")
}

tree_kb() { # tree_kb PID FIELD → a /proc/PID/status field in kB, summed over PID and its direct children
  { cat /proc/[0-9]*/status 2>/dev/null || true; } | awk -v pid="$1" -v f="$2:" '
    $1 == "Pid:" { self = $2 } $1 == "PPid:" { parent = $2 }
    $1 == f && (self == pid || parent == pid) { total += $2 }
    END { print total + 0 }'
}

cpu_ticks() { # cpu_ticks PID → user+system clock ticks of PID and its direct children
  # Processes may exit while /proc is read: cat skips them. After the parenthesised
  # command name, $2 is the parent, $12 and $13 utime and stime.
  { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v pid="$1" '
    { self = $1; sub(/^.*\) /, "") }
    self == pid || $2 == pid { total += $12 + $13 }
    END { print total + 0 }'
}
CLK_TCK=$(getconf CLK_TCK)

UPSTREAM_PORT=$(free_port)
"$UPSTREAM_BIN" "127.0.0.1:$UPSTREAM_PORT" >"$WORK/upstream.log" 2>&1 &
UPSTREAM_PID=$!
PIDS+=("$UPSTREAM_PID")
wait_port "$UPSTREAM_PORT" "$UPSTREAM_PID"

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$WORK" --daemonize no --loglevel warning >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
wait_port "$REDIS_PORT" "$REDIS_PID"

NGINX_PORT=""
if [ -n "$NGINX" ]; then
  NGINX_PORT=$(free_port)
  mkdir -p "$WORK/nginx"
  user_line=""
  # Run as the current user: a root master would otherwise start its workers as nobody.
  [ "$(id -u)" -ne 0 ] || user_line="user $(id -un) $(id -gn);"
  cat >"$WORK/nginx/nginx.conf" <<EOF
# worker_processes auto = one worker per CPU, the same as the proxy's worker threads (limits.workers: 0).
worker_processes auto;
daemon off;
$user_line
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/client_body;
  proxy_temp_path $WORK/nginx/proxy;
  fastcgi_temp_path $WORK/nginx/fastcgi;
  uwsgi_temp_path $WORK/nginx/uwsgi;
  scgi_temp_path $WORK/nginx/scgi;
  # Like the proxy, never close a busy keep-alive connection after N requests.
  keepalive_requests 1000000;
  upstream app {
    server 127.0.0.1:$UPSTREAM_PORT;
    keepalive 64;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
  if "$NGINX" -t -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" \
    >"$WORK/nginx/test.log" 2>&1; then
    "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" \
      >"$WORK/nginx/stdout.log" 2>&1 &
    NGINX_PID=$!
    PIDS+=("$NGINX_PID")
    wait_port "$NGINX_PORT" "$NGINX_PID" || NGINX_PORT=""
  else
    log "nginx refused its configuration (see below); the nginx reference is skipped"
    cat "$WORK/nginx/test.log" >&2
    NGINX_PORT=""
  fi
fi

# --- load ---------------------------------------------------------------------------
# A browser's Cookie header: the session among analytics and preference cookies. The
# ID placeholder is well-formed but unknown; session scenarios put a live one in.
cookie_header() {
  echo "_ga=GA1.2.1234567890.1700000000; theme=dark; session=$1; lang=en-US"
}
PLACEHOLDER_ID=$(printf 'A%.0s' $(seq 1 43))

RESULTS=$WORK/results.tsv
printf 'round\tkey\tscenario\trps\tp50_ms\tp99_ms\terrors\tidle_rss_kb\tpeak_rss_kb\tcpu_us_per_req\tcheck\tref_rps\tref_p99_ms\n' >"$RESULTS"
# The nginx run just before a proxy scenario: its ratios compare the two side by side.
REF_RPS=- REF_P99=-

to_ms() { # wrk latency (e.g. 812.00us, 1.23ms, 1.01s) → milliseconds
  awk -v v="$1" 'BEGIN {
    n = v + 0
    if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n = n; else if (v ~ /m$/) n *= 60000; else if (v ~ /s$/) n *= 1000
    printf "%.3f", n }'
}

# run_wrk KEY LABEL URL COOKIE SERVER_PID [IDLE_RSS_KB] [METRICS_URL EXPECTED_OUTCOME]
run_wrk() {
  local key=$1 label=$2 url=$3 cookie=$4 pid=$5 idle=${6:--} metrics=${7:-} outcome=${8:-}
  local lua=$WORK/$key.lua out=$WORK/$key.$ROUND.wrk
  printf 'wrk.headers["Cookie"] = "%s"\n' "$cookie" >"$lua"
  log "round $ROUND/$ROUNDS, $label: warm-up ${WARMUP}s, then ${DURATION}s"
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"${WARMUP}s" -s "$lua" "$url" >/dev/null
  local before_count=0 before_cpu
  [ -z "$metrics" ] || before_count=$(outcome_count "$metrics" "$outcome")
  before_cpu=$(cpu_ticks "$pid")
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$lua" "$url" >"$out"
  local after_cpu requests rps p50 p99 errors peak check="-"
  after_cpu=$(cpu_ticks "$pid")
  requests=$(awk '/requests in/ { print $1 }' "$out")
  rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
  p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$out")")
  p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$out")")
  errors=$(awk '/Non-2xx or 3xx responses:/ { n += $NF } /Socket errors:/ { gsub(/,/, ""); n += $4 + $6 + $8 + $10 } END { print n + 0 }' "$out")
  peak=$(tree_kb "$pid" VmHWM)
  if [ -n "$metrics" ]; then
    # Every measured request must have done the session work the scenario is about.
    local done_count
    done_count=$(( $(outcome_count "$metrics" "$outcome") - before_count ))
    if [ "$done_count" -ge "$requests" ]; then check="ok"; else check="only $done_count of $requests $outcome"; fi
  fi
  local cpu_us
  cpu_us=$(awk -v t=$((after_cpu - before_cpu)) -v hz="$CLK_TCK" -v n="$requests" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
  [ "$errors" = 0 ] || log "$label: $errors errors or non-2xx responses"
  [ "$check" = "ok" ] || [ "$check" = "-" ] || log "$label: $check"
  local ref_rps=- ref_p99=-
  if [ "$key" = nginx ]; then
    REF_RPS=$rps REF_P99=$p99
  elif [ "$idle" != - ]; then
    ref_rps=$REF_RPS ref_p99=$REF_P99
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$ROUND" "$key" "$label" "$rps" "$p50" "$p99" "$errors" \
    "$idle" "$peak" "$cpu_us" "$check" "$ref_rps" "$ref_p99" >>"$RESULTS"
}

outcome_count() { # outcome_count METRICS_URL OUTCOME → requests answered 2xx with that outcome
  python3 - "$1" "$2" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
print(int(sum(float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("session_proxy_requests_total{")
              and 'status="2xx"' in line and f'session="{sys.argv[2]}"' in line)))
EOF
}

session_cookie() { # session_cookie PORT → the ID the proxy sets after a write
  python3 - "$1" <<'EOF'
import http.client, sys
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=5)
conn.request("GET", "/write/login")
response = conn.getresponse()
response.read()
for name, value in response.getheaders():
    if name.lower() == "set-cookie" and value.startswith("session="):
        print(value.split(";")[0].split("=", 1)[1])
        break
else:
    sys.exit(f"no session cookie in the proxy's answer ({response.status})")
EOF
}

# proxy_scenario KEY LABEL PATH STORE(memory|redis) RENEW(true|false) LEVEL(warn|info) OUTCOME
proxy_scenario() {
  local key=$1 label=$2 path=$3 store=$4 renew=$5 level=$6 outcome=$7
  local port admin config=$WORK/$key.yaml
  port=$(free_port)
  admin=$(free_port)
  {
    echo "listen: 127.0.0.1:$port"
    echo "upstream: http://127.0.0.1:$UPSTREAM_PORT"
    echo "admin_listen: 127.0.0.1:$admin"
    echo "session:"
    echo "  renew_on_access: $renew"
    echo "  exclude: [\"/static/**\"]"
    echo "store:"
    if [ "$store" = redis ]; then
      echo "  type: redis"
      echo "  url: redis://127.0.0.1:$REDIS_PORT"
    else
      echo "  type: memory"
    fi
    echo "shutdown: {drain_delay: 0, timeout: 2}"
    echo "log: {level: $level}"
  } >"$config"
  env -u RUST_LOG "$PROXY_BIN" --config "$config" 2>"$WORK/$key.$ROUND.log" &
  local pid=$!
  PIDS+=("$pid")
  wait_port "$port" "$pid"
  sleep 0.5
  local idle id
  idle=$(tree_kb "$pid" VmRSS)
  id=$(session_cookie "$port")
  run_wrk "$key" "$label" "http://127.0.0.1:$port$path" "$(cookie_header "$id")" "$pid" "$idle" \
    "http://127.0.0.1:$admin/metrics" "$outcome"
  stop "$pid"
}

cpu_busy() { # cpu_busy SECONDS → % of all CPUs busy over that time (before the load: other work)
  local a b
  a=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat)
  sleep "$1"
  b=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat)
  echo "$a $b" | awk '{ busy = $3 - $1; idle = $4 - $2; printf "%.0f", 100 * busy / (busy + idle) }'
}
cpu_jiffies() { # busy and total jiffies of all CPUs
  awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat
}
own_ticks() { # CPU ticks of this script's process tree: itself, waited-for children, live servers
  local t p
  t=$(sed 's/.*) //' "/proc/$$/stat" | awk '{ print $12 + $13 + $14 + $15 }')
  for p in "$UPSTREAM_PID" "$REDIS_PID" ${NGINX_PID:-}; do t=$((t + $(cpu_ticks "$p"))); done
  echo "$t"
}
BUSY_BEFORE=$(cpu_busy 3)
LOAD_START=$(cat /proc/loadavg)
read -r SYS_BUSY0 SYS_TOTAL0 <<<"$(cpu_jiffies)"
OWN0=$(own_ticks)
for ROUND in $(seq 1 "$ROUNDS"); do
  run_wrk direct "direct to upstream (ceiling)" "http://127.0.0.1:$UPSTREAM_PORT/read" \
    "$(cookie_header "$PLACEHOLDER_ID")" "$UPSTREAM_PID"
  # nginx runs again right before each proxy scenario, which is compared with that run:
  # a machine whose speed drifts (a busy virtualisation host) then moves both sides of
  # a ratio alike.
  while read -r key path store renew level outcome label <&3; do
    if [ -n "$NGINX_PORT" ]; then
      run_wrk nginx "nginx proxy_pass (reference)" "http://127.0.0.1:$NGINX_PORT/read" \
        "$(cookie_header "$PLACEHOLDER_ID")" "$NGINX_PID"
    fi
    proxy_scenario "$key" "$label" "$path" "$store" "$renew" "$level" "$outcome"
  done 3<<'SCENARIOS'
excluded /static/app.js memory false warn excluded proxy, excluded path
read_memory /read memory false warn read proxy, session read, memory
read_memory_renew /read memory true warn read proxy, session read + renew_on_access, memory
write_memory /write memory false warn updated proxy, session write every request, memory
read_redis /read redis false warn read proxy, session read, Redis
write_redis /write redis false warn updated proxy, session write every request, Redis
read_memory_info /read memory false info read proxy, session read, memory, access log at info
SCENARIOS
done
LOAD_END=$(cat /proc/loadavg)
read -r SYS_BUSY1 SYS_TOTAL1 <<<"$(cpu_jiffies)"
OWN1=$(own_ticks)
# Share of all CPUs that processes outside this benchmark used while it ran.
BUSY_OTHER=$(awk -v b=$((SYS_BUSY1 - SYS_BUSY0)) -v o=$((OWN1 - OWN0)) -v t=$((SYS_TOTAL1 - SYS_TOTAL0)) \
  'BEGIN { x = 100 * (b - o) / t; if (x < 0) x = 0; printf "%.0f", x }')
log "CPU ticks during the load runs: all CPUs busy $((SYS_BUSY1 - SYS_BUSY0)) of $((SYS_TOTAL1 - SYS_TOTAL0)), this benchmark $((OWN1 - OWN0))"

log "memory per stored session: filling a memory store with $SESSIONS sessions…"
"$MEMORY_BIN" "$SESSIONS" >"$WORK/memory.txt"

# --- report -------------------------------------------------------------------------
export RESULTS WORK ROOT ROUNDS DURATION WARMUP CONNECTIONS THREADS SESSIONS LOAD_START LOAD_END BUSY_BEFORE BUSY_OTHER
export NGINX_VERSION=""
[ -z "$NGINX_PORT" ] || NGINX_VERSION=$("$NGINX" -v 2>&1 | sed 's/.*nginx\///')
export WRK_VERSION REDIS_VERSION
WRK_VERSION=$( (wrk -v 2>&1 || true) | awk 'NR == 1 { print $2 }')
REDIS_VERSION=$(redis-server --version | sed 's/.* v=\([^ ]*\).*/\1/')
mkdir -p docs/benchmarks
python3 - <<'EOF'
import csv, datetime, os, platform, re, subprocess

env = os.environ
import statistics

# One row per scenario: the median of each figure over the rounds, the largest peak RSS,
# every error counted, and the spread of req/s to show how steady the machine was.
runs = list(csv.DictReader(open(env["RESULTS"]), delimiter="\t"))
rows = []
for key in dict.fromkeys(r["key"] for r in runs):
    mine = [r for r in runs if r["key"] == key]
    def median(field):
        return f"{statistics.median(float(r[field]) for r in mine):.3f}"
    rps = [float(r["rps"]) for r in mine]
    rows.append({
        "key": key, "scenario": mine[0]["scenario"], "rps": median("rps"),
        "p50_ms": median("p50_ms"), "p99_ms": median("p99_ms"),
        "errors": str(sum(int(r["errors"]) for r in mine)),
        "idle_rss_kb": "-" if mine[0]["idle_rss_kb"] == "-" else str(int(float(median("idle_rss_kb")))),
        "peak_rss_kb": str(max(int(r["peak_rss_kb"]) for r in mine)),
        "cpu_us_per_req": f"{statistics.median(float(r['cpu_us_per_req']) for r in mine):.1f}",
        "check": next((r["check"] for r in mine if r["check"] not in ("ok", "-")), mine[0]["check"]),
        "spread": f"{min(rps):,.0f}–{max(rps):,.0f}",
    })
by_key = {r["key"]: r for r in rows}
memory = dict(line.strip().split("=", 1) for line in open(os.path.join(env["WORK"], "memory.txt")) if "=" in line)
nginx = by_key.get("nginx")

def ratio(row, field, invert=False):
    """A proxy scenario against the nginx run just before it, the median over the rounds;
    another row against nginx's median."""
    if not nginx:
        return None
    ref = {"rps": "ref_rps", "p99_ms": "ref_p99_ms"}[field]
    pairs = [(float(r[field]), float(r[ref])) for r in runs
             if r["key"] == row["key"] and r.get(ref, "-") not in ("-", "", None)]
    if pairs:
        return statistics.median(mine / theirs for mine, theirs in pairs)
    return float(row[field]) / float(nginx[field])

def fmt_ratio(x):
    return "–" if x is None else f"{x:.2f}×"

header = ["scenario", "req/s", "p50 ms", "p99 ms", "req/s vs nginx", "p99 vs nginx"]
table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
for r in rows:
    table.append("| " + " | ".join([
        r["scenario"], f'{float(r["rps"]):,.0f}', f'{float(r["p50_ms"]):.2f}', f'{float(r["p99_ms"]):.2f}',
        fmt_ratio(ratio(r, "rps")), fmt_ratio(ratio(r, "p99_ms")),
    ]) + " |")

proxy_rows = [r for r in rows if r["idle_rss_kb"] != "-"]
resources = ["| scenario | req/s, slowest–fastest round | idle RSS MB | peak RSS (VmHWM) MB | CPU µs/request | check | errors |", "|---|---|---|---|---|---|---|"]
for r in rows:
    idle = "–" if r["idle_rss_kb"] == "-" else f'{int(r["idle_rss_kb"]) / 1024:.1f}'
    resources.append(f'| {r["scenario"]} | {r["spread"]} | {idle} | {int(r["peak_rss_kb"]) / 1024:.1f} | {r["cpu_us_per_req"]} | {r["check"]} | {r["errors"]} |')

idle_mb = max(int(r["idle_rss_kb"]) for r in proxy_rows) / 1024 if proxy_rows else None
peak_mb = max(int(r["peak_rss_kb"]) for r in proxy_rows) / 1024 if proxy_rows else None
overhead = float(memory["overhead_bytes_per_session"])

def target(name, ok, measured):
    if ok is None:
        return f"| {name} | {measured} | not measured |"
    return f"| {name} | {measured} | {'**met**' if ok else '**missed**'} |"

targets = ["| target | measured | |", "|---|---|---|"]
rm, wr = by_key.get("read_memory"), by_key.get("write_redis")
if nginx and rm:
    targets.append(target("session read, memory: ≥ 1.0× nginx req/s", ratio(rm, "rps") >= 1.0, fmt_ratio(ratio(rm, "rps"))))
    targets.append(target("session read, memory: p99 ≤ 1.5× nginx", ratio(rm, "p99_ms") <= 1.5, fmt_ratio(ratio(rm, "p99_ms"))))
else:
    targets.append(target("session read, memory vs nginx", None, "nginx not available"))
if nginx and wr:
    targets.append(target("session write, Redis: ≥ 0.8× nginx req/s", ratio(wr, "rps") >= 0.8, fmt_ratio(ratio(wr, "rps"))))
if idle_mb is not None:
    targets.append(target("idle RSS ≤ 20 MB", idle_mb <= 20, f"{idle_mb:.1f} MB (largest of the proxy runs)"))
targets.append(target("≤ 300 bytes overhead per stored session", overhead <= 300, f"{overhead:.0f} bytes"))

def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem_gb = next((int(l.split()[1]) / 1024 / 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
machine = [
    f"- date: {now}",
    f"- machine: {sh('nproc')} CPUs ({cpu}), {mem_gb:.0f} GB RAM, kernel {platform.release()}",
    f"- code: `{sh('git rev-parse --short HEAD') or '?'}`"
    + (" with uncommitted changes" if sh("git status --porcelain --untracked-files=no") else ""),
    f"- quiet machine? other work kept the CPUs {env['BUSY_BEFORE']}% busy in the 3 s before the first scenario and used "
    f"{env['BUSY_OTHER']}% of them during the load runs (0–5% is quiet); "
    f"1-min load average {env['LOAD_START'].split()[0]} before and {env['LOAD_END'].split()[0]} after",
    f"- command: `scripts/bench.sh` ({env['ROUNDS']} rounds of every scenario, medians shown): wrk {env['WRK_VERSION']} "
    f"`-t{env['THREADS']} -c{env['CONNECTIONS']} -d{env['DURATION']}s --latency` after a {env['WARMUP']} s warm-up, keep-alive, "
    "the same `Cookie` header (4 cookies) on every scenario",
    f"- nginx {env['NGINX_VERSION'] or '(not available)'} with `worker_processes auto` (one per CPU, as many as the proxy's "
    "worker threads, `limits.workers: 0`), `access_log off`, keep-alive to the upstream (`keepalive 64`); "
    f"redis-server {env['REDIS_VERSION']}, no persistence; the proxy at `log.level: warn` unless the row says otherwise",
    "- everything (wrk, proxy or nginx, upstream, Redis) runs on the same machine and shares its CPUs",
]
mem = [
    f"- proxy idle RSS (after start, before load): {idle_mb:.1f} MB; peak RSS (VmHWM) under load: {peak_mb:.1f} MB" if proxy_rows else "",
    f"- memory store, {int(memory['sessions']):,} sessions of {float(memory['data_bytes_per_session']):.0f} bytes of JSON: "
    f"{float(memory['bytes_per_session']):.0f} bytes each, so **{overhead:.0f} bytes of overhead per stored session** beyond its data "
    "(`examples/memory_per_session.rs`: RSS after − before, divided by the count, minus the data); "
    f"{float(memory['overhead_after_one_read_bytes_per_session']):.0f} bytes once every session has been read once",
]
body = "\n".join([
    "## Throughput and latency", "", *table, "",
    "## Proxy process", "", *resources, "",
    f"Medians over {env['ROUNDS']} rounds; a proxy scenario's ratios are the median of its ratios to the nginx run just before it in each round (nginx's row: the median of all its runs). `check`: in every round the proxy's `/metrics` counted every measured request "
    "with the scenario's session outcome (`excluded`, `read` or `updated`). CPU is user + system time of the server "
    "process(es) per request. A wide req/s spread means the machine's speed changed between rounds.", "",
    "## Memory", "", *[m for m in mem if m], "",
    "## Targets", "", *targets, "",
    "## Machine and method", "", *machine, "",
])
chart = os.path.join(env["ROOT"], "docs/benchmarks/throughput.png")
results = "# Benchmark results\n\nWritten by `scripts/bench.sh`; see [../benchmarks.md](../benchmarks.md) for what each scenario measures.\n\n" + body + "\n![req/s and p99 per scenario](throughput.png)\n"
open(os.path.join(env["ROOT"], "docs/benchmarks/results.md"), "w").write(results)

# The same results, in place, in docs/benchmarks.md.
doc_path = os.path.join(env["ROOT"], "docs/benchmarks.md")
if os.path.exists(doc_path):
    doc = open(doc_path).read()
    section = ("<!-- results:begin (written by scripts/bench.sh) -->\n"
               + re.sub(r"^## ", "### ", body, flags=re.M)
               + "\n![req/s and p99 per scenario](benchmarks/throughput.png)\n<!-- results:end -->")
    doc, n = re.subn(r"<!-- results:begin.*?<!-- results:end -->", lambda _: section, doc, flags=re.S)
    if n:
        open(doc_path, "w").write(doc)

print("\n".join(table))
print()
print("\n".join(resources))
print()
print("\n".join(m for m in mem if m))
print()
print("\n".join(targets))

# The chart.
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("bench: matplotlib is not available; docs/benchmarks/throughput.png not written")
else:
    labels = [r["scenario"] for r in rows][::-1]
    colors = ["#7f7f7f" if r["key"] == "direct" else "#2ca02c" if r["key"] == "nginx" else "#1f77b4" for r in rows][::-1]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 0.55 * len(rows) + 1.6), sharey=True)
    rps = [float(r["rps"]) for r in rows][::-1]
    p99 = [float(r["p99_ms"]) for r in rows][::-1]
    a.barh(labels, rps, color=colors)
    a.set_xlabel("requests/s (higher is better)")
    b.barh(labels, p99, color=colors)
    b.set_xlabel("p99 latency, ms (lower is better)")
    for ax, values, fmt in ((a, rps, "{:,.0f}"), (b, p99, "{:.2f}")):
        for y, v in enumerate(values):
            ax.text(v, y, " " + fmt.format(v), va="center", fontsize=8)
        ax.margins(x=0.2)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"session-proxy vs nginx — wrk -c{env['CONNECTIONS']}, median of {env['ROUNDS']} × {env['DURATION']} s, {now}")
    fig.tight_layout()
    fig.savefig(chart, dpi=110)
    print(f"bench: wrote {chart}")
EOF
log "wrote docs/benchmarks/results.md"
