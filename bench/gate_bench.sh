#!/bin/sh
# Requests/s: directly to a Twisted hello backend, through the haikutx gate,
# and through PicoLisp's httpGate, on loopback with wrk, with keep-alive and
# with a new connection per request (Connection: close), all in one run.
# For the haikutx gate it also prints the CPU time the gate process spent
# per request (from /proc, so it means something on a shared machine too),
# and for every run the CPU time the backend spent per request (the
# yardstick: the gate's own cost beside an application's). With keep-alive
# it also measures the backend directly with the X-Forwarded-* fields the
# gate adds ("direct+fwd"): any proxy that adds them makes the backend parse
# them, so haikutx/direct+fwd is the gate's own share of the slowdown.
#
#   sh bench/gate_bench.sh [seconds] [connections] [rounds]
#
# Needs: wrk, picolisp (Debian's, for bin/httpGate); PY and TWISTD name the
# Python and twistd of an environment with haikutx's dependencies.
set -eu
cd "$(dirname "$0")/.."
DUR=${1:-10}
CONN=${2:-16}
ROUNDS=${3:-1}
PY=${PY:-.venv/bin/python}
BACK=18181 GATE=18180 PIL=18182
HTTPGATE=$(dpkg -L picolisp | grep '/bin/httpGate$')
PIDS=""
cleanup() {
    for p in $PIDS; do kill "$p" 2>/dev/null || true; done
    sleep 1
    for p in $PIDS; do kill -KILL "$p" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

wait_port() {
    i=0
    until "$PY" -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 1)" 2>/dev/null; do
        i=$((i + 1)); [ $i -lt 100 ] || { echo "port $1 never opened" >&2; exit 1; }
        sleep 0.1
    done
}

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

run() { # name url [wrk options]: prints "name req/s [gate-cpu/req] backend-cpu/req"
    name=$1 url=$2; shift 2
    t0=$(ticks "$GATEPID") b0=$(ticks "$BACKPID")
    wrk -t1 -c"$CONN" -d"${DUR}s" "$@" "$url" > /tmp/gate_bench_$name.txt
    t1=$(ticks "$GATEPID") b1=$(ticks "$BACKPID")
    rps=$(awk '/Requests\/sec/ {print $2}' /tmp/gate_bench_$name.txt)
    n=$(awk '/requests in/ {print $1}' /tmp/gate_bench_$name.txt)
    "$PY" -c "
us = lambda a, b: f'{(b - a) * 1e6 / $(getconf CLK_TCK) / $n:.0f}us/req'
gate = f' gate {us($t0, $t1)}' if '$name' == 'haikutx' else ''
print('$name', $rps, gate.strip(), 'backend', us($b0, $b1))"
}

ratios() { # direct haikutx httpGate [direct+fwd] lines
    d=$(echo "$1" | cut -d' ' -f2); g=$(echo "$2" | cut -d' ' -f2); p=$(echo "$3" | cut -d' ' -f2)
    f=$(echo "${4:-x $d}" | cut -d' ' -f2)
    "$PY" -c "print(f'haikutx/direct {$g/$d:.0%}  httpGate/direct {$p/$d:.0%}  haikutx/httpGate {$g/$p:.2f}x' + (f'  haikutx/direct+fwd {$g/$f:.0%}' if '${4:-}' else ''))"
}

"$PY" bench/hello_backend.py $BACK & BACKPID=$!
PIDS="$PIDS $BACKPID"
PYTHONPATH=. "${TWISTD:-.venv/bin/twistd}" -n --pidfile= --logfile=/dev/null haiku \
    --port none --sslport none --gate "tcp:$GATE:interface=127.0.0.1" & GATEPID=$!
PIDS="$PIDS $GATEPID"
LANG=C.UTF-8 "$HTTPGATE" $PIL $BACK
wait_port $BACK; wait_port $GATE; wait_port $PIL
# httpGate daemonizes: find its listening process to stop it afterwards.
PILPID=$(ss -Hltnp "sport = :$PIL" | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -1)
PIDS="$PIDS $PILPID"

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -sr), load $(cut -d' ' -f1-3 /proc/loadavg)"
r=0
while [ $r -lt "$ROUNDS" ]; do
    r=$((r + 1))
    echo "round $r: wrk -t1 -c$CONN -d${DUR}s, keep-alive, GET /$BACK/ through the gates"
    D=$(run direct "http://127.0.0.1:$BACK/")
    F=$(run direct+fwd "http://127.0.0.1:$BACK/" -H "X-Forwarded-For: 127.0.0.1" \
        -H "X-Forwarded-Proto: http" -H "X-Forwarded-Host: 127.0.0.1:$GATE")
    G=$(run haikutx "http://127.0.0.1:$GATE/$BACK/")
    P=$(run httpGate "http://127.0.0.1:$PIL/$BACK/")
    echo "$D"; echo "$F"; echo "$G"; echo "$P"; ratios "$D" "$G" "$P" "$F"
    echo "round $r: new connection per request (-H 'Connection: close')"
    D=$(run direct "http://127.0.0.1:$BACK/" -H "Connection: close")
    G=$(run haikutx "http://127.0.0.1:$GATE/$BACK/" -H "Connection: close")
    P=$(run httpGate "http://127.0.0.1:$PIL/$BACK/" -H "Connection: close")
    echo "$D"; echo "$G"; echo "$P"; ratios "$D" "$G" "$P"
done
