#!/bin/sh
# Requests/s: directly to a Twisted hello backend, through the haikutx gate,
# and through PicoLisp's httpGate, on loopback with wrk (keep-alive).
#
#   sh bench/gate_bench.sh [seconds] [connections]
#
# Needs: apt-get install -y wrk picolisp; the project installed in .venv.
set -eu
cd "$(dirname "$0")/.."
DUR=${1:-10}
CONN=${2:-16}
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

run() { # name url [wrk options]
    name=$1 url=$2; shift 2
    wrk -t2 -c"$CONN" -d"${DUR}s" "$@" "$url" | tee /tmp/gate_bench_$name.txt \
        | awk -v n="$name" '/Requests\/sec/ {print n, $2}'
}

"$PY" bench/hello_backend.py $BACK & PIDS="$PIDS $!"
PYTHONPATH=. "${TWISTD:-.venv/bin/twistd}" -n --pidfile= --logfile=/dev/null haiku \
    --port none --sslport none --gate "tcp:$GATE:interface=127.0.0.1" & PIDS="$PIDS $!"
LANG=C.UTF-8 "$HTTPGATE" $PIL $BACK
wait_port $BACK; wait_port $GATE; wait_port $PIL
# httpGate daemonizes: find its listening process to stop it afterwards.
PILPID=$(ss -Hltnp "sport = :$PIL" | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -1)
PIDS="$PIDS $PILPID"

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -sr)"
echo "wrk -t2 -c$CONN -d${DUR}s, keep-alive, GET /$BACK/ through the gates"
D=$(run direct "http://127.0.0.1:$BACK/")
G=$(run haikutx "http://127.0.0.1:$GATE/$BACK/")
P=$(run httpGate "http://127.0.0.1:$PIL/$BACK/")
echo "$D"; echo "$G"; echo "$P"
d=$(echo "$D" | cut -d' ' -f2); g=$(echo "$G" | cut -d' ' -f2); p=$(echo "$P" | cut -d' ' -f2)
"$PY" -c "print(f'haikutx/direct {$g/$d:.0%}  httpGate/direct {$p/$d:.0%}  haikutx/httpGate {$g/$p:.0%}')"
echo "new connection per request (-H 'Connection: close')"
D=$(run direct "http://127.0.0.1:$BACK/" -H "Connection: close")
G=$(run haikutx "http://127.0.0.1:$GATE/$BACK/" -H "Connection: close")
P=$(run httpGate "http://127.0.0.1:$PIL/$BACK/" -H "Connection: close")
echo "$D"; echo "$G"; echo "$P"
d=$(echo "$D" | cut -d' ' -f2); g=$(echo "$G" | cut -d' ' -f2); p=$(echo "$P" | cut -d' ' -f2)
"$PY" -c "print(f'haikutx/direct {$g/$d:.0%}  httpGate/direct {$p/$d:.0%}  haikutx/httpGate {$g/$p:.0%}')"
