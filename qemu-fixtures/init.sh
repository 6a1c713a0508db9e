#!/bin/sh
# /init of the acpimon test guest (busybox initramfs built by qemu-fixtures/build-guest).
#
# Kernel command line (everything optional):
#   acpimon.scenario=healthy|userspace-stop|panic   what the guest does (default healthy)
#   acpimon.delay=N                                 seconds before stop/panic (default 3)
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
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    acpimon.scenario=*) scenario=${arg#acpimon.scenario=} ;;
    acpimon.delay=*) delay=${arg#acpimon.delay=} ;;
  esac
done
# Start on a fresh line: firmware text (SeaBIOS's "Booting from ROM..") may end without one.
echo
say "boot scenario=$scenario uptime=$(uptime_s) kernel=$(uname -r)"
case "$delay" in '' | *[!0-9]*)
  say "error: acpimon.delay='$delay' is not a whole number of seconds, using 3"
  delay=3 ;;
esac

# Magic SysRq fully on, so the panic scenario (and a host sending a serial break) works.
echo 1 >/proc/sys/kernel/sysrq

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

case "$scenario" in
  healthy | userspace-stop | panic) ;;
  *)
    say "error: unknown scenario '$scenario' (want healthy, userspace-stop or panic), behaving as healthy"
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
esac
