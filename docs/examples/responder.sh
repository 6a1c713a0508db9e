#!/bin/sh
# A complete acpimon app-protocol responder in POSIX sh (docs/app-protocol.md): runs under
# busybox ash, dash and bash, needs only cat, sleep, tr, head, sed and awk (busybox has them
# all), and uses timeout(1) for audits when there is one.
#
#   challenge -> ack (echoing seq and nonce)
#   health    -> health (echoing id), status from $STATUS_FILE, running the audit named in
#                the request if it is in the table below
#   hello     -> hello (the host greets when it connects; we greet back)
#   anything else (other types, other versions, not JSON, binary, over 4096 bytes) is ignored
#
# Knobs (environment):
#   PORT           the app port (default /dev/virtio-ports/org.acpimon.app.0; without udev the
#                  /dev/vportNpM whose /sys/class/virtio-ports/*/name matches is used).
#                  PORT=- reads requests from stdin and writes answers to stdout, and exits at
#                  EOF: for tests (sh responder.sh <requests) and for wiring it up yourself.
#   STATUS_FILE    optional; its first line is 'ok|degraded|failed [DETAILS]' (missing or
#                  empty: ok; anything else: degraded)
#   APP            the app name sent in hello (default responder.sh)
#   AUDIT_TIMEOUT  seconds an audit may run when timeout(1) exists (default 10); it is then
#                  killed and reports timeout's exit status
#
# Limits of a shell responder (acpimon-responder, the static binary built from responder/,
# has none of them): an audit delays the answers behind it; a write while the host is
# disconnected blocks until it reconnects; audit output and details are reduced to printable
# ASCII (so that a cut can never split a UTF-8 character) and 1024 bytes. Run it as a file
# (sh responder.sh): audits re-run "$0" under timeout(1).
#
# A failed audit (exit status other than 0) makes the status 'degraded' unless the status file
# says worse; an audit name not in the table answers 'degraded', details "unknown audit",
# exit 127 (as acpimon-responder does).

# --- the audit table: edit to taste ------------------------------------------------------
AUDITS="disk uptime fail"
run_audit() { # NAME: runs one audit; its output and exit status are the result
  case "$1" in
    disk) df / ;;
    uptime) cat /proc/uptime ;;
    fail) echo "this audit always fails"; return 1 ;;
    *) return 127 ;;
  esac
}
# -------------------------------------------------------------------------------------------

if [ "${1:-}" = --run-audit ]; then # the re-run under timeout(1)
  run_audit "$2"
  exit
fi

PORT=${PORT:-/dev/virtio-ports/org.acpimon.app.0}
APP=${APP:-responder.sh}
AUDIT_TIMEOUT=${AUDIT_TIMEOUT:-10}
case $AUDIT_TIMEOUT in '' | *[!0-9]*) AUDIT_TIMEOUT=10 ;; esac

log() { echo "responder.sh: $*" >&2; }

# stdin -> the contents of a JSON string: printable ASCII, at most 1024 bytes, \ and "
# escaped, line breaks as \n.
json_text() {
  tr -d '\000-\010\013-\037\177-\377' | tr '\t' ' ' | head -c 1024 |
    sed 's/\\/\\\\/g; s/"/\\"/g' | awk 'NR > 1 { printf "%s", "\\n" } { printf "%s", $0 }'
}

# The string value of member $1 in $line, if it is short and plain (what we echo must need
# no escaping); fails otherwise.
field_str() {
  case $line in *\""$1"\":*) ;; *) return 1 ;; esac
  v=${line#*\""$1"\":}
  v=${v#"${v%%[! ]*}"}
  case $v in \"*) v=${v#\"} v=${v%%\"*} ;; *) return 1 ;; esac
  case $v in '' | *[!A-Za-z0-9._:-]*) return 1 ;; esac
  [ ${#v} -le 64 ] || return 1
  printf '%s' "$v"
}

# The non-negative integer value of member $1 in $line; fails otherwise.
field_int() {
  case $line in *\""$1"\":*) ;; *) return 1 ;; esac
  v=${line#*\""$1"\":}
  v=${v#"${v%%[! ]*}"}
  v=${v%%[!0-9]*}
  case $v in '' | ????????????????????*) return 1 ;; esac
  printf '%s' "$v"
}

# Sets status and details (escaped) from $STATUS_FILE.
read_status() {
  status=ok details=
  [ -n "${STATUS_FILE:-}" ] && [ -e "$STATUS_FILE" ] || return 0
  first=
  if ! IFS= read -r first <"$STATUS_FILE" && [ -z "$first" ]; then
    [ -r "$STATUS_FILE" ] || { status=degraded details="status file: cannot read it"; }
    return 0
  fi
  first=$(printf '%s' "$first" | json_text)
  word=${first%%[ \\]*} rest=${first#"$word"}
  rest=${rest#"${rest%%[! ]*}"}
  case $word in
    '' | ok | OK | Ok) status=ok details=$rest ;;
    degraded | DEGRADED | Degraded) status=degraded details=$rest ;;
    failed | FAILED | Failed) status=failed details=$rest ;;
    *) status=degraded details="status file: unknown status" ;;
  esac
}

# Prints a health message: $1 = the id's JSON ('' for none), then optionally the audit's
# name, exit status and (escaped) output.
say_health() {
  m='{"v":1,"type":"health"'
  [ -z "$1" ] || m="$m,\"id\":$1"
  m="$m,\"status\":\"$status\""
  [ -z "$details" ] || m="$m,\"details\":\"$details\""
  [ $# -lt 2 ] || m="$m,\"audit\":{\"name\":\"$2\",\"exit\":$3,\"output\":\"$4\"}"
  printf '%s}\n' "$m"
}

answer() {
  case $line in *'"v":1,'* | *'"v":1}'* | *'"v": 1,'* | *'"v": 1}'*) ;; *) return 0 ;; esac
  case $line in
    *'"type":"challenge"'* | *'"type": "challenge"'*)
      nonce=$(field_str nonce) || return 0
      if seq=$(field_int seq); then
        printf '{"v":1,"type":"ack","seq":%s,"nonce":"%s"}\n' "$seq" "$nonce"
      else
        printf '{"v":1,"type":"ack","nonce":"%s"}\n' "$nonce"
      fi
      ;;
    *'"type":"health"'* | *'"type": "health"'*)
      if id=$(field_str id); then
        id="\"$id\""
      elif id=$(field_int id); then
        :
      else
        case $line in *'"id":'*) return 0 ;; esac # an id we cannot echo: no answer
        id=
      fi
      read_status
      case $line in
        *'"audit":"'* | *'"audit": "'*) ;;
        *) say_health "$id"; return 0 ;;
      esac
      name=$(field_str audit) || name=invalid
      case " $AUDITS " in
        *" $name "*)
          if command -v timeout >/dev/null 2>&1; then
            out=$(timeout -s KILL "$AUDIT_TIMEOUT" sh "$0" --run-audit "$name" </dev/null 2>&1)
          else
            out=$(run_audit "$name" </dev/null 2>&1)
          fi
          rc=$?
          out=$(printf '%s' "$out" | json_text)
          if [ "$rc" != 0 ] && [ "$status" = ok ]; then
            status=degraded details="audit $name failed (exit $rc)"
          fi
          say_health "$id" "$name" "$rc" "$out"
          ;;
        *)
          [ "$status" != ok ] || { status=degraded details="unknown audit"; }
          say_health "$id" "$name" 127 "not configured; configured audits: $AUDITS"
          ;;
      esac
      ;;
    *'"type":"hello"'* | *'"type": "hello"'*)
      printf '{"v":1,"type":"hello","app":"%s","version":"1"}\n' "$(printf '%s' "$APP" | json_text)"
      ;;
  esac
}

serve() { # stdin -> stdout until EOF
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line%"$cr"}
    [ ${#line} -le 4095 ] || continue
    answer
    line=
  done
}

cr=$(printf '\r')

if [ "$PORT" = - ]; then
  serve
  exit 0
fi

# The port: the path itself, or (no udev) the vport whose sysfs name is its last component.
find_port() {
  [ -e "$PORT" ] && { echo "$PORT"; return 0; }
  for n in /sys/class/virtio-ports/*/name; do
    [ -r "$n" ] && [ "$(cat "$n")" = "${PORT##*/}" ] || continue
    d=${n%/name}
    [ -e "/dev/${d##*/}" ] && { echo "/dev/${d##*/}"; return 0; }
  done
  return 1
}

# While no host is connected, reads of the port return EOF at once: serve returns, and we
# look again a second later. (A failed redirection does not end the shell: serve is a
# function, not a special built-in.)
waiting=
while :; do
  if p=$(find_port); then
    serve <>"$p" >&0 || true
  elif [ -z "$waiting" ]; then
    log "waiting for $PORT"
    waiting=1
  fi
  sleep 1
done
