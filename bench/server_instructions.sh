#!/bin/bash
# Instructions the runtime server executes, counted by callgrind (which does
# not depend on the machine's load): start `twistd -n haiku -w 4 -r R` under
# valgrind, serve 30 hello requests, then wrk for SECONDS (none if 0), dump
# the counts (callgrind_control: under valgrind the server cannot stop, as
# valgrind does not know pidfd_send_signal) and print the total and the
# requests served. Two runs, with SECONDS 0 and N at once, give the
# instructions per request: (Ir_N - Ir_0) / (requests_N - requests_0).
#
#   bench/server_instructions.sh 1 0 PORT1 & bench/server_instructions.sh 1 40 PORT2; wait
set -u
R=$1; S=$2; PORT=$3
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
d=$(mktemp -d); mkdir $d/h $d/s; cp $ROOT/samples/hello.py $d/h/
cd $ROOT
PYTHONPATH=$ROOT PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=$d/cg.out $PY $(dirname $PY)/twistd -n --pidfile=$d/pid haiku --port tcp:$PORT:interface=127.0.0.1 --sslport none --state $d/s --handlers $d/h -w 4 -r $R --maxqueue 64 > $d/log 2>&1 &
for i in $(seq 1 120); do curl -s -m 2 "http://127.0.0.1:$PORT/?x-haiku-handler=hello.py" > /dev/null && break; sleep 1; done
for i in $(seq 1 30); do curl -s "http://127.0.0.1:$PORT/?x-haiku-handler=hello.py" > /dev/null; done
if [ "$S" != 0 ]; then wrk -t1 -c8 -d${S}s "http://127.0.0.1:$PORT/?x-haiku-handler=hello.py" > $d/wrk; fi
sleep 1
callgrind_control -d "$(cat $d/pid)" > /dev/null 2>&1
sleep 3
kill -KILL "$(cat $d/pid)"; wait 2> /dev/null
echo "R=$R S=$S requests=$(grep -c 'GET hello.py -> 200' $d/log) Ir=$(grep -hE '^summary:' $d/cg.out.* | awk '{print $2}')"
rm -rf $d
