#!/bin/sh
# /init of the acpimon test guest (busybox initramfs built by qemu-fixtures/build-guest).
#
# Kernel command line (everything optional):
#   acpimon.scenario=healthy|userspace-stop|panic|starve|flood   what the guest does (default healthy)
#   acpimon.delay=N                       seconds before stop/panic/starve/flood (default 3)
#   acpimon.app=responder|sh|none         app-protocol responder on the port org.acpimon.app.0
#                                         (default none): /bin/acpimon-responder (status file
#                                         /run/app-status, audits disk = df /run, fail = false,
#                                         uptime = cat /proc/uptime; log /run/app.log) or
#                                         /bin/responder.sh (docs/examples/responder.sh)
#   acpimon.app_mailbox=1                 beat the app mailbox too (acpimon-responder --mailbox,
#                                         or alone --mailbox-only when app is not responder)
#   acpimon.qga=1                         start qemu-ga on org.qemu.guest_agent.0 (log /run/qga.log)
#   acpimon.app_stop_after=N              kill the app (responder, sh, mailbox: SIGKILL) N s
#                                         after it started ("ACPIMON-GUEST: app stopped ...")
#   acpimon.app_degrade_after=N           write "degraded disk nearly full" to /run/app-status
#                                         N s after the app started ("... app status degraded")
#   acpimon.app_garbage=N                 acpimon-responder --garbage N (N junk lines first)
#   acpimon.fault=softlockup|hardlockup|hung|oom|panic
#                                         a fault acpimon.fault_delay s (default 5) after
#                                         "ready", with any scenario: softlockup/hardlockup
#                                         load acpimon_faults.ko (qemu-fixtures/faults) with
#                                         cpu=acpimon.fault_cpu (default 1) -- a kthread bound
#                                         there spins with preemption (and for hardlockup
#                                         interrupts) off; with hardlockup another CPU runs a
#                                         command every second (RCU then has grace periods to
#                                         report the stall by); hung loads it for a kthread blocked
#                                         in D state; oom starts a memory hog (busybox tail
#                                         /dev/zero, oom_score_adj 1000) that the OOM killer
#                                         kills; panic: SysRq c. Marker: "ACPIMON-GUEST: fault
#                                         F cpu=N now uptime=U" (then the module's own line)
#   acpimon.load=user|kernel              a load, not a fault: just before "ready", one busy
#                                         process per CPU (taskset), spinning in userspace (a
#                                         shell loop) or mostly in the kernel (dd if=/dev/zero
#                                         of=/dev/null bs=1M); marker "ACPIMON-GUEST: load L
#                                         started on N cpus"
#   acpimon.disk_write=DEV                a write to a disk, not a fault of the guest's: once,
#                                         acpimon.delay s after "ready", dd writes 4 KiB to
#                                         /dev/DEV (e.g. vda, a virtio-blk drive; waits up to
#                                         10 s for it) with O_DIRECT, so the write reaches QEMU at
#                                         once (a test's drive whose writes fail on the host);
#                                         markers "ACPIMON-GUEST: disk write DEV now uptime=U",
#                                         then "... disk write DEV done: STATUS"
#   acpimon.hung_task_timeout=N           kernel.hung_task_timeout_secs (default 10 with
#                                         fault=hung, else the kernel's)
#   sysctl.kernel.sysrq=N                 (the kernel's own, 5.8+) kept: SysRq is not turned
#                                         fully on (e.g. 438, Debian's default)
#
# The app and qemu-ga start in the background, each once its port shows up (at most 10 s),
# so they never delay "ready"; their markers ("ACPIMON-GUEST: app responder started pid=P",
# "ACPIMON-GUEST: app sh started", "ACPIMON-GUEST: app mailbox started",
# "ACPIMON-GUEST: qemu-ga started pid=P version=V", or "... failed: why") come on a line of their
# own. udev is absent: /dev/virtio-ports/NAME symlinks are made here from
# /sys/class/virtio-ports/*/name. /run is a tmpfs (the responder's "disk" audit reports it).
#
# starve: every CPU runs a SCHED_FIFO 99 busy loop with RT throttling off, so nothing of lower
# priority runs again: no userspace, no workqueue, no threaded IRQ handler (FIFO 50; ACPI
# GED's _EVT runs in one, so the heartbeat stops). Hard IRQs still run: the serial port's,
# so SysRq over the console answers, and NMIs.
#
# flood: after "flooding the console now", the guest writes lines to its serial console as
# fast as QEMU takes them, for ever ("ACPIMON-FLOOD " and filler, 64 bytes a line), from a
# process of its own: the shell, the kernel and the heartbeat go on answering.
#
# Every line meant for tests starts with "ACPIMON-GUEST: " and goes to /dev/console
# (ttyS0 with console=ttyS0). The line "ACPIMON-GUEST: ready" means the shell is being
# started; anything typed on the serial line after it is read by that shell.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
export PS1='acpimon-guest# '

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Reopen the console from devtmpfs: if the kernel could not open /dev/console before
# /init started, init would otherwise have no stdin/stdout at all.
exec </dev/console >/dev/console 2>&1
mkdir -p /tmp /run
# /run on its own tmpfs: a file system the app's "disk" audit (df /run) can report on
# (busybox df skips the initramfs's rootfs).
mount -t tmpfs -o size=16m,mode=755 tmpfs /run

# Once the shell runs, its prompt sits on the console without a newline: start markers
# on a line of their own then, so that they can be matched at the start of a line.
shell_started=0
say() {
  [ "$shell_started" = 0 ] || echo
  echo "ACPIMON-GUEST: $*"
}
uptime_s() { read -r up _ </proc/uptime; echo "$up"; }

scenario=healthy
delay=3
app=none app_mailbox=0 qga=0 app_stop_after='' app_degrade_after='' app_garbage=''
fault='' fault_cpu=1 fault_delay=5 hung_task_timeout='' load='' sysrq_set=0 disk_write=''
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    acpimon.scenario=*) scenario=${arg#acpimon.scenario=} ;;
    acpimon.delay=*) delay=${arg#acpimon.delay=} ;;
    acpimon.app=*) app=${arg#acpimon.app=} ;;
    acpimon.app_mailbox=*) app_mailbox=${arg#acpimon.app_mailbox=} ;;
    acpimon.qga=*) qga=${arg#acpimon.qga=} ;;
    acpimon.app_stop_after=*) app_stop_after=${arg#acpimon.app_stop_after=} ;;
    acpimon.app_degrade_after=*) app_degrade_after=${arg#acpimon.app_degrade_after=} ;;
    acpimon.app_garbage=*) app_garbage=${arg#acpimon.app_garbage=} ;;
    acpimon.fault=*) fault=${arg#acpimon.fault=} ;;
    acpimon.fault_cpu=*) fault_cpu=${arg#acpimon.fault_cpu=} ;;
    acpimon.fault_delay=*) fault_delay=${arg#acpimon.fault_delay=} ;;
    acpimon.hung_task_timeout=*) hung_task_timeout=${arg#acpimon.hung_task_timeout=} ;;
    acpimon.load=*) load=${arg#acpimon.load=} ;;
    acpimon.disk_write=*) disk_write=${arg#acpimon.disk_write=} ;;
    sysctl.kernel.sysrq=*) sysrq_set=1 ;;
  esac
done
# Start on a fresh line: firmware text (SeaBIOS's "Booting from ROM..") may end without one.
echo
say "boot scenario=$scenario uptime=$(uptime_s) kernel=$(uname -r)"
case "$delay" in '' | *[!0-9]*)
  say "error: acpimon.delay='$delay' is not a whole number of seconds, using 3"
  delay=3 ;;
esac

# Magic SysRq fully on, so the panic scenario (and a host sending a serial break) works,
# unless the kernel command line set it.
[ "$sysrq_set" = 1 ] || echo 1 >/proc/sys/kernel/sysrq

# Modules: build-guest lists the ones that exist as modules in /etc/acpimon/modules
# (dependencies come from modules.dep) and the built-in ones in /etc/acpimon/builtin.
loaded="" failed=""
for m in $(cat /etc/acpimon/modules 2>/dev/null); do
  if modprobe "$m" 2>/tmp/modprobe.err; then
    loaded="$loaded $m"
  else
    failed="$failed $m"
    say "modprobe $m failed: $(cat /tmp/modprobe.err)"
  fi
done
say "modules loaded:${loaded:- none} failed:${failed:- none} builtin: $(cat /etc/acpimon/builtin 2>/dev/null)"

# ACPI facts that help when debugging the SSDT acpimon injects (harmless when absent).
say "acpi tables: $(ls /sys/firmware/acpi/tables 2>/dev/null | tr '\n' ' ')"
acpi_devs() { # HID: the ACPI device instances with that id, e.g. "ACPI0013:00"
  for d in /sys/bus/acpi/devices/"$1":*; do [ -e "$d" ] && printf '%s ' "${d##*/}"; done
}
say "acpi ged (ACPI0013): $(acpi_devs ACPI0013)irqs: $(grep 'ACPI:Ged' /proc/interrupts | awk '{print $1}' | tr -d ':' | tr '\n' ' ')"
say "acpi pvpanic (QEMU0001): $(acpi_devs QEMU0001)"
tz_found=0
for tz in /sys/class/thermal/thermal_zone*; do
  [ -e "$tz" ] || continue
  tz_found=1
  say "thermal zone ${tz##*/}: type=$(cat "$tz/type" 2>/dev/null) temp=$(cat "$tz/temp" 2>/dev/null)"
done
[ "$tz_found" = 1 ] || say "thermal zone: none"

# --- the app: responder, mailbox, qemu-ga ---------------------------------------------------

# Markers from the background: the shell's prompt may sit on the console, so always start
# on a fresh line.
bg_say() { printf '\nACPIMON-GUEST: %s\n' "$*"; }

whole_seconds() { # NAME VALUE: VALUE if a whole number, else '' (with an error marker)
  case "$2" in
    '') ;;
    *[!0-9]*) say "error: acpimon.$1='$2' is not a whole number, ignored" >&2 ;;
    *) echo "$2" ;;
  esac
}
app_stop_after=$(whole_seconds app_stop_after "$app_stop_after")
app_degrade_after=$(whole_seconds app_degrade_after "$app_degrade_after")
app_garbage=$(whole_seconds app_garbage "$app_garbage")
case "$app" in
  responder | sh | none) ;;
  *) say "error: unknown acpimon.app='$app' (want responder, sh or none), using none"; app=none ;;
esac
[ "$app_mailbox" = 1 ] || app_mailbox=0
[ "$qga" = 1 ] || qga=0

# What udev would do: /dev/virtio-ports/NAME -> ../vportNpM for every named port.
link_ports() {
  mkdir -p /dev/virtio-ports
  for n in /sys/class/virtio-ports/*/name; do
    [ -r "$n" ] || continue
    name=$(cat "$n")
    d=${n%/name}
    d=${d##*/}
    [ -n "$name" ] && [ -e "/dev/$d" ] && [ ! -e "/dev/virtio-ports/$name" ] &&
      ln -s "../$d" "/dev/virtio-ports/$name" 2>/dev/null # (the app's and qga's waits race)
  done
}

# Waits up to 10 s for /dev/virtio-ports/$1 (ports appear shortly after virtio_console binds).
wait_port() {
  i=0
  while [ "$i" -lt 100 ]; do
    link_ports
    [ -e "/dev/virtio-ports/$1" ] && return 0
    sleep 0.1
    i=$((i + 1))
  done
  return 1
}

# Starts "$@" in the background with its output in $log; prints its pid, or fails if it
# died at once (the log's last line goes to stderr then).
spawn() {
  log=$1
  shift
  "$@" </dev/null >>"$log" 2>&1 &
  pid=$!
  sleep 0.2
  if kill -0 "$pid" 2>/dev/null; then
    echo "$pid"
  else
    tail -n 1 "$log" >&2
    return 1
  fi
}

start_app() {
  app_port=org.acpimon.app.0
  pids=""
  echo ok >/run/app-status
  if [ "$app" != none ]; then
    if ! wait_port "$app_port"; then
      bg_say "app $app failed: no port $app_port after 10 s (add a virtserialport named $app_port)"
    elif [ "$app" = responder ]; then
      set -- --status-file /run/app-status --audit "disk=df /run" --audit "fail=false" \
        --audit "uptime=cat /proc/uptime"
      [ "$app_mailbox" = 0 ] || set -- "$@" --mailbox
      [ -z "$app_garbage" ] || set -- "$@" --garbage "$app_garbage"
      if pid=$(spawn /run/app.log /bin/acpimon-responder "$@" 2>/run/app.err); then
        pids="$pids $pid"
        bg_say "app responder started pid=$pid port=/dev/virtio-ports/$app_port$([ "$app_mailbox" = 0 ] || echo ' mailbox=1')"
      else
        bg_say "app responder failed: $(cat /run/app.err)"
      fi
    else
      [ -z "$app_garbage" ] || bg_say "note: acpimon.app_garbage applies to acpimon-responder only"
      if pid=$(STATUS_FILE=/run/app-status spawn /run/app.log sh /bin/responder.sh 2>/run/app.err); then
        pids="$pids $pid"
        bg_say "app sh started pid=$pid port=/dev/virtio-ports/$app_port"
      else
        bg_say "app sh failed: $(cat /run/app.err)"
      fi
    fi
  fi
  if [ "$app_mailbox" = 1 ] && [ "$app" != responder ]; then
    if pid=$(spawn /run/app-mailbox.log /bin/acpimon-responder --mailbox-only --status-file /run/app-status \
      2>/run/app.err); then
      pids="$pids $pid"
      bg_say "app mailbox started pid=$pid"
    else
      bg_say "app mailbox failed: $(cat /run/app.err)"
    fi
  fi
  [ -n "$pids" ] || return 0
  # The timed events, in order of their delays.
  {
    [ -z "$app_degrade_after" ] || echo "$app_degrade_after degrade"
    [ -z "$app_stop_after" ] || echo "$app_stop_after stop"
  } | sort -n | {
    waited=0
    while read -r at what; do
      [ "$at" -le "$waited" ] || sleep $((at - waited))
      waited=$at
      case "$what" in
        degrade)
          echo "degraded disk nearly full" >/run/app-status.new
          mv /run/app-status.new /run/app-status
          bg_say "app status degraded uptime=$(uptime_s)"
          ;;
        stop)
          # shellcheck disable=SC2086
          kill -KILL $pids 2>/dev/null
          bg_say "app stopped (killed$pids) uptime=$(uptime_s)"
          ;;
      esac
    done
  }
}

start_qga() {
  qga_port=org.qemu.guest_agent.0
  if ! wait_port "$qga_port"; then
    bg_say "qemu-ga failed: no port $qga_port after 10 s (add a virtserialport named $qga_port)"
  elif pid=$(spawn /run/qga.log /usr/sbin/qemu-ga -m virtio-serial -p "/dev/virtio-ports/$qga_port" \
    -t /run 2>/run/qga.err); then
    bg_say "qemu-ga started pid=$pid version=$(/usr/sbin/qemu-ga --version 2>/dev/null | sed -n 's/^QEMU Guest Agent //p')"
  else
    bg_say "qemu-ga failed: $(cat /run/qga.err)"
  fi
}

[ "$app" = none ] && [ "$app_mailbox" = 0 ] || start_app &
[ "$qga" = 0 ] || start_qga &

# --- a fault on demand ----------------------------------------------------------------------
fault_cpu=$(whole_seconds fault_cpu "$fault_cpu")
fault_delay=$(whole_seconds fault_delay "$fault_delay")
hung_task_timeout=$(whole_seconds hung_task_timeout "$hung_task_timeout")
case "$fault" in
  '' | softlockup | hardlockup | hung | oom | panic) ;;
  *) say "error: unknown acpimon.fault='$fault' (want softlockup, hardlockup, hung, oom or panic), none"; fault='' ;;
esac
[ -n "$hung_task_timeout" ] || [ "$fault" != hung ] || hung_task_timeout=10
if [ -n "$hung_task_timeout" ]; then
  echo "$hung_task_timeout" >/proc/sys/kernel/hung_task_timeout_secs ||
    say "error: cannot set kernel.hung_task_timeout_secs (no CONFIG_DETECT_HUNG_TASK?)"
fi
start_fault() {
  sleep "${fault_delay:-5}"
  bg_say "fault $fault cpu=${fault_cpu:-1} now uptime=$(uptime_s)"
  case "$fault" in
    softlockup | hardlockup | hung)
      modprobe acpimon_faults fault="$fault" cpu="${fault_cpu:-1}" 2>/tmp/fault.err ||
        bg_say "fault $fault failed: modprobe acpimon_faults: $(cat /tmp/fault.err)"
      # A quiet guest needs no RCU grace period, so nothing would report a CPU that has its
      # interrupts off (no perf NMI watchdog under TCG): keep another CPU doing a little work.
      if [ "$fault" = hardlockup ]; then
        other=0
        [ "${fault_cpu:-1}" != 0 ] || other=1
        taskset -c "$other" sh -c 'while :; do ls -l /proc/self/ >/dev/null; sleep 1; done' &
      fi
      ;;
    oom)
      # tail keeps the last line of an endless one in memory: it grows until killed
      (echo 1000 >/proc/self/oom_score_adj && exec tail /dev/zero >/dev/null) &
      bg_say "fault oom hog pid=$!"
      ;;
    panic) echo c >/proc/sysrq-trigger ;;
  esac
}
[ -z "$fault" ] || start_fault &
start_load() {
  n=$(grep -c '^processor' /proc/cpuinfo)
  c=0
  while [ "$c" -lt "$n" ]; do
    case "$load" in
      user) taskset -c "$c" sh -c 'while :; do :; done' & ;;
      kernel) taskset -c "$c" dd if=/dev/zero of=/dev/null bs=1M 2>/dev/null & ;;
    esac
    c=$((c + 1))
  done
  bg_say "load $load started on $n cpus"
}
case "$load" in
  '') ;;
  user | kernel) start_load ;;
  *) say "error: unknown acpimon.load='$load' (want user or kernel), none" ;;
esac

# --- a write to a disk ------------------------------------------------------------------------
start_disk_write() {
  i=0
  while [ ! -b "/dev/$disk_write" ] && [ "$i" -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
  done
  sleep "$delay"
  bg_say "disk write $disk_write now uptime=$(uptime_s)"
  # With werror=stop the write blocks until QEMU resumes the VM; its status comes after.
  if dd if=/dev/zero of="/dev/$disk_write" bs=4k count=1 oflag=direct 2>/tmp/disk.err; then
    bg_say "disk write $disk_write done: ok"
  else
    bg_say "disk write $disk_write done: failed: $(tail -n 1 /tmp/disk.err)"
  fi
}
case "$disk_write" in
  '') ;;
  *[!a-z0-9]*) say "error: acpimon.disk_write='$disk_write' is not a device name (e.g. vda), none" ;;
  *) start_disk_write & ;;
esac

# An interactive shell on the console tty; cttyhack finds that tty (ttyS0) and makes it
# the controlling terminal, setsid gives it its own session. Respawned if it exits.
# Note for tests reading the transcript: busybox's line editing echoes what is typed and
# writes ESC[6n (a cursor position query, unanswered and harmless) after each prompt.
shell_loop() {
  while :; do
    setsid cttyhack sh
    sleep 1
  done
}

# Blocks forever without running: opening a fifo for reading waits for a writer,
# and nobody ever opens it for writing.
block_forever() {
  mkfifo /run/never
  while :; do read -r _ </run/never; done
}

# Whether process $1 runs rt-spin (below) at SCHED_FIFO yet: /proc/PID/stat's 2nd field is
# the command, its 41st the policy (1 = SCHED_FIFO).
spinning() {
  # shellcheck disable=SC2046
  set -- $(cat "/proc/$1/stat" 2>/dev/null)
  [ "${2:-}" = "(rt-spin)" ] && [ "${41:-}" = 1 ]
}

# Writes a 162-byte static x86-64 executable (busybox here has no chrt): it makes itself
# SCHED_FIFO 99 with sched_setscheduler(0, SCHED_FIFO, {99}), then spins forever; given any
# argument it exits 0 instead (a check that the call works); if the call fails it exits
# with the error number's low byte.
make_spinner() {
  {
    # ELF64 header: x86-64 executable, entry 0x400078, one program header at offset 64
    printf '\177ELF\2\1\1\0\0\0\0\0\0\0\0\0'
    printf '\2\0\76\0\1\0\0\0' ; printf '\170\0\100\0\0\0\0\0'
    printf '\100\0\0\0\0\0\0\0' ; printf '\0\0\0\0\0\0\0\0'
    printf '\0\0\0\0\100\0\70\0' ; printf '\1\0\0\0\0\0\0\0'
    # PT_LOAD, R+X: the whole file (162 bytes) at 0x400000
    printf '\1\0\0\0\5\0\0\0' ; printf '\0\0\0\0\0\0\0\0'
    printf '\0\0\100\0\0\0\0\0' ; printf '\0\0\100\0\0\0\0\0'
    printf '\242\0\0\0\0\0\0\0' ; printf '\242\0\0\0\0\0\0\0'
    printf '\0\20\0\0\0\0\0\0'
    # code at 0x400078
    printf '\110\213\34\44'     # mov rbx,[rsp]     argc
    printf '\152\143'           # push 99           struct sched_param on the stack
    printf '\110\211\342'       # mov rdx,rsp
    printf '\61\377'            # xor edi,edi       pid 0: this process
    printf '\152\1\136'         # push 1; pop rsi   SCHED_FIFO
    printf '\270\220\0\0\0'     # mov eax,144       sched_setscheduler
    printf '\17\5'              # syscall
    printf '\211\307'           # mov edi,eax       exit status if it failed
    printf '\205\300'           # test eax,eax
    printf '\165\10'            # jnz exit
    printf '\110\203\373\1'     # cmp rbx,1
    printf '\165\2'             # jne exit          (an argument: check only, status 0)
    printf '\353\376'           # spin: jmp spin
    printf '\270\74\0\0\0'      # exit: mov eax,60
    printf '\17\5'              # syscall
  } >"$1"
  chmod 755 "$1"
}

case "$scenario" in
  healthy | userspace-stop | panic | starve | flood) ;;
  *)
    say "error: unknown scenario '$scenario' (want healthy, userspace-stop, panic, starve or flood), behaving as healthy"
    scenario=healthy ;;
esac

if [ "$scenario" = healthy ]; then
  say "shell starting uptime=$(uptime_s)"
  say ready
  # init itself runs the loop, so it also reaps orphans while it waits for the shell.
  shell_loop
fi

shell_loop &
say "shell starting uptime=$(uptime_s)"
say ready
shell_started=1
case "$scenario" in
  userspace-stop)
    say "stopping userspace in $delay s"
    sleep "$delay"
    say "stopping userspace now uptime=$(uptime_s)"
    # kill -1 reaches every process but init itself; init then blocks without running.
    kill -STOP -1
    block_forever
    ;;
  panic)
    say "will panic in $delay s"
    sleep "$delay"
    say "panicking"
    echo c >/proc/sysrq-trigger
    block_forever
    ;;
  starve)
    make_spinner /bin/rt-spin
    /bin/rt-spin check
    rc=$?
    if [ "$rc" != 0 ]; then
      say "error: rt-spin cannot make itself SCHED_FIFO (status $rc); not starving"
      block_forever
    fi
    ncpu=$(grep -c '^processor' /proc/cpuinfo)
    last=$((ncpu - 1))
    say "will starve $ncpu cpus in $delay s"
    sleep "$delay"
    say "starving $ncpu cpus now uptime=$(uptime_s)"
    echo -1 >/proc/sys/kernel/sched_rt_runtime_us
    # init stays on the last CPU while it starts the spinners of the others, each forked
    # there and then moved (it waits until one spins before starting the next: a child
    # still on init's CPU would be stuck behind that CPU's spinner), then starts that
    # CPU's own, after which it never runs again.
    taskset -p -c "$last" $$ >/dev/null
    cpu=0
    while [ "$cpu" -lt "$last" ]; do
      taskset -c "$cpu" /bin/rt-spin &
      until spinning $!; do sleep 0.05; done
      cpu=$((cpu + 1))
    done
    taskset -c "$last" /bin/rt-spin &
    block_forever
    ;;
  flood)
    say "will flood the console in $delay s"
    sleep "$delay"
    say "flooding the console now uptime=$(uptime_s)"
    # busybox yes: one write per line, as fast as the serial port drains.
    yes 'ACPIMON-FLOOD 0123456789abcdefghijklmnopqrstuvwxyz0123456789ABCDEF' >/dev/console 2>/dev/null &
    block_forever
    ;;
esac
