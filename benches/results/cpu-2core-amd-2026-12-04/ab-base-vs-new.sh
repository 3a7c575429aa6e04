#!/bin/bash
# The interleaved A/B of BENCHMARKS.md's eleventh measurement: runs each binary in turn, `rounds` times.
# usage: bash ab-base-vs-new.sh CONFIG ROUNDS BIN_A BIN_B...   (outputs and report JSON go to /tmp)
cfg=$1; rounds=$2; shift 2
for r in $(seq $rounds); do
  for b in "$@"; do
    /usr/bin/time -f "$b round $r: %e s wall, %U user, %S sys" $b merge $cfg /tmp/ab-out-$(basename $b) --force -q --threads 2 --report-json /tmp/ab-$(basename $b)-$r.json 2>&1 | grep round
  done
done
