#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup
ip link set lo up
echo "@@BEGIN $(uname -r) $(uname -m)"
# at STAGE: the guest's uptime as STAGE starts (the host tells where a guest's minutes go).
at() { read -r up _ < /proc/uptime; echo "@@AT $up $*"; }
at check
echo "@@CHECK"
/bindtrace --check --verbose
echo "@@CHECK_EXIT $?"
at auto
/bindtrace --attach auto --no-diagnosis -d 1s -o ndjson --file /tmp/auto.ndjson 2>/tmp/auto.txt
echo "@@AUTO exit=$?"
cat /tmp/auto.ndjson /tmp/auto.txt
at ring_4k
# A ring of 4K: one page on most kernels, less than one on 16K/64K-page kernels, where it
# must be refused with one line and status 2.
/bindtrace --ring-buffer-size 4K --no-diagnosis -d 1s -o none --no-summary 2>/tmp/ring.txt
echo "@@RING4K exit=$?"
cat /tmp/ring.txt
# attach LOG ARGS...: starts bindtrace ARGS in the background with its stderr in LOG, as
# $tracer, and waits until it says it is attached (fails if it ends first, or after 2 min).
attach() {
  log=$1; shift
  rm -f "$log"
  /bindtrace "$@" 2>"$log" &
  tracer=$!
  i=0
  while ! grep -q attached "$log" 2>/dev/null; do
    sleep 0.2; i=$((i + 1))
    if [ $i -gt 600 ] || ! kill -0 $tracer 2>/dev/null; then return 1; fi
  done
}
# The per-thread checks under one bindtrace ($backend): `bind-scenarios --collide N`, then
# `--sleepers`, each thread's events counted by `bind-scenarios --count` (threads of one
# never bind in the other), after @@COLLISION and @@SLEEPERS. One start for both: under TCG a
# start costs seconds.
counted() {
  rm -f /tmp/counted.ndjson /tmp/collide-plan.json /tmp/sleepers-plan.json
  if attach /tmp/counted.txt --attach "$backend" $PER_THREAD_TRACER_ARGS --file /tmp/counted.ndjson; then
    /bind-scenarios --collide $COLLIDE_BINDS > /tmp/collide-plan.json
    /bind-scenarios --sleepers > /tmp/sleepers-plan.json
    sleep 1
    kill -INT $tracer 2>/dev/null
    wait $tracer
  else
    kill $tracer 2>/dev/null
    wait $tracer
  fi
  for run in collide:COLLISION sleepers:SLEEPERS; do
    echo "@@${run#*:}"
    if [ -s "/tmp/${run%:*}-plan.json" ]; then
      /bind-scenarios --count "/tmp/${run%:*}-plan.json" /tmp/counted.ndjson
    fi
  done
  # bindtrace's own words on those runs (its warnings), for a failure's console.
  while read -r line; do echo "tracer-stderr: $line"; done < /tmp/counted.txt
}
for backend in $BACKENDS; do
  at "$backend" scenarios
  rm -f /tmp/events.ndjson
  if attach /tmp/stderr.txt --attach "$backend" -o ndjson --file /tmp/events.ndjson; then
    /bind-scenarios > /tmp/scenarios.ndjson
    if [ -x /bind-scenarios-i386 ]; then /bind-scenarios-i386 --compat >> /tmp/scenarios.ndjson; fi
    # The port of a running `nc -l`, asked for again: EADDRINUSE, seen with the requested port.
    nc -l -p 41100 >/dev/null 2>&1 &
    holder=$!
    sleep 0.5
    nc -l -p 41100 >/dev/null 2>&1
    kill $holder 2>/dev/null
    sleep 1
    kill -INT $tracer 2>/dev/null
  else
    # Refused (ended), or not attached after 2 min: nothing to run against it.
    kill $tracer 2>/dev/null
    : > /tmp/scenarios.ndjson
  fi
  wait $tracer
  echo "@@BACKEND $backend exit=$?"
  echo "@@STDERR"; cat /tmp/stderr.txt
  echo "@@EVENTS"; cat /tmp/events.ndjson
  echo "@@SCENARIOS"; cat /tmp/scenarios.ndjson
  at "$backend" cgroup_scope
  # --cgroup in the kernel: a listener inside /bt-scope is reported, one outside is not.
  rm -f /tmp/scope.ndjson
  mkdir -p /sys/fs/cgroup/bt-scope
  attach /tmp/scope.txt --attach "$backend" --no-diagnosis --cgroup /bt-scope -o ndjson --file /tmp/scope.ndjson
  sh -c 'echo $$ > /sys/fs/cgroup/bt-scope/cgroup.procs; exec nc -l -p 41201' >/dev/null 2>&1 &
  inside=$!
  nc -l -p 41202 >/dev/null 2>&1 &
  outside=$!
  sleep 1
  kill $inside $outside 2>/dev/null
  kill -INT $tracer 2>/dev/null
  wait $tracer
  echo "@@SCOPE exit=$?"; cat /tmp/scope.txt /tmp/scope.ndjson
  at "$backend" process_tree
  # -- CMD: the tree's binds (a child, a grandchild, a daemon left behind, an exec chain),
  # and its exit status (3); a bind outside the tree while CMD runs (once CMD says it has
  # started) is not reported. Every wait is bounded.
  rm -f /tmp/tree.ndjson /tmp/daemon-done /tmp/tree-started /tmp/outside-done
  (i=0; while [ ! -e /tmp/tree-started ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
   /bind-scenarios --bind 41301; echo > /tmp/outside-done) &
  /bindtrace --attach "$backend" --no-diagnosis -o ndjson --file /tmp/tree.ndjson -- /bin/sh -c '
    echo > /tmp/tree-started
    i=0; while [ ! -e /tmp/outside-done ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    /bind-scenarios --bind 41302
    sh -c "/bind-scenarios --bind 41303"
    sh -c "(sleep 0.2; /bind-scenarios --bind 41304; echo > /tmp/daemon-done) &"
    sh -c "exec sh -c \"exec /bind-scenarios --bind 41305\""
    i=0; while [ ! -e /tmp/daemon-done ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    exit 3' 2>/tmp/tree.txt
  echo "@@TREE exit=$?"; cat /tmp/tree.txt /tmp/tree.ndjson
  # Per-thread state, counted here (the events are too many for the console): two threads
  # whose tids once shared an entry slot bind at the same time (every bind reported once);
  # many AF_UNIX binds sleep at once in one directory's lock (each reported, or counted lost
  # when a kretprobe's return instances run out).
  at "$backend" per_thread_state
  counted
done
# What tracing costs here (emulated: indicative only), when the host asks for it on the kernel
# command line: a getppid loop (collateral) and a bind storm, untraced and with bindtrace
# attached on fexit and kprobe (the hooks the project's host refuses; it measures the
# tracepoint itself), three rounds.
at costs
echo "@@COSTS"
grep -q bindtrace.costs /proc/cmdline && for round in 1 2 3; do
  echo "collateral untraced $(/syscall-loop 500000)"
  echo "storm untraced $(/bind-storm --mode ok --binds 20000)"
  for backend in fexit kprobe; do
    if attach /tmp/cost.txt --attach "$backend" --errno EADDRINUSE --no-diagnosis -o none --no-summary; then
      echo "collateral $backend $(/syscall-loop 500000)"
    fi
    kill -INT $tracer 2>/dev/null; wait $tracer
    if attach /tmp/cost.txt --attach "$backend" --comm bind-storm -o ndjson --file /dev/null --no-summary; then
      echo "storm $backend $(/bind-storm --mode ok --binds 20000)"
    fi
    kill -INT $tracer 2>/dev/null; wait $tracer
  done
done
at end
echo "@@END"
poweroff -f
