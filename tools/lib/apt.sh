# Shared by tools/qemu-old, tools/ovmf, tools/libvirt and qemu-fixtures/build-guest: apt with a
# PRIVATE configuration for Debian suites other than the machine's own, and small helpers.
# Source it (bash); it defines functions only and sets nothing up until called.
#
# A private configuration lives in ${ACPIMON_APT_DIR:-$HOME/.cache/acpimon/apt}/<suite>/:
#   sources.list   one-line sources for <suite>, <suite>-updates and <suite>-security, whose
#                  archive URIs are taken from the machine's own apt sources (deb822 *.sources
#                  or one-line *.list): no mirror host is written anywhere in the repository
#   lists/ cache/  apt's lists and caches for that suite alone; status  an empty dpkg status
# apt-get and apt-cache are run with -o options naming these (Dir::Etc::sourcelist,
# Dir::Etc::sourceparts=-, Dir::State::Lists, Dir::Cache, Dir::State::status, no preferences),
# so the machine's own apt state is neither read nor changed.
#
#   papt_setup SUITE     writes the sources (if changed) and runs apt-get update when the lists
#                        are missing, older than ACPIMON_APT_MAX_AGE_DAYS (7) or the sources changed
#   papt_update SUITE    apt-get update now (after a failed download: the lists were stale)
#   papt_cache SUITE ... apt-cache with the private configuration
#   papt_download SUITE DIR pkg=ver...   apt-get download into DIR
#   papt_best SUITE PKG REGEX            highest version of PKG matching REGEX, no backports
#   papt_fingerprint SUITE               changes whenever the private lists change
#   host_codename, host_fingerprint, max_version, archive_uri [security]

papt_log() { echo "${papt_prog:-apt}: $*" >&2; }
papt_die() { echo "${papt_prog:-apt}: error: $*" >&2; exit 1; }

host_codename() { (. /etc/os-release && echo "${VERSION_CODENAME:-}"); }

# Fingerprint of the machine's own apt lists and preferences: while it is unchanged, so is
# what the machine's apt would pick.
host_fingerprint() {
  local files=() f
  for f in /var/lib/apt/lists/*_Packages* /etc/apt/preferences /etc/apt/preferences.d/* \
           /etc/apt/sources.list /etc/apt/sources.list.d/*; do
    [ -e "$f" ] && files+=("$f")
  done
  [ ${#files[@]} -gt 0 ] || { echo none; return; }
  stat -c '%n %s %Y' "${files[@]}" | sha256sum | cut -c1-16
}

# Highest version among a list on stdin (one per line), by Debian's ordering.
max_version() {
  local best="" v
  while read -r v; do
    [ -n "$v" ] || continue
    if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then best=$v; fi
  done
  echo "$best"
}

# The URI of the machine's Debian archive: the first enabled source whose suite is the
# machine's codename (or, with "security", whose suite ends in -security). Prints nothing
# if there is none.
archive_uri() { # [security]
  local want cn f uri=""
  cn=$(host_codename)
  if [ "${1:-}" = security ]; then want="${cn}-security"; else want="$cn"; fi
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk -v want="$want" '
      /^[[:space:]]*$/ { if (u != "" && s && e) { print u; exit } u=""; s=0; e=1; next }
      /^Enabled:[[:space:]]*no/ { e=0 }
      /^URIs:/ { u=$2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == want) s=1 }
      BEGIN { e=1 }
      END { if (u != "" && s && e) print u }' "$f" | head -n1)
    [ -n "$uri" ] && break
  done
  if [ -z "$uri" ]; then
    uri=$(grep -hsE "^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?[a-z]+://[^[:space:]]+[[:space:]]+${want}[[:space:]]" \
            /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
          sed -E 's/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/' | head -n1)
  fi
  echo "$uri"
}

papt_dir() { echo "${ACPIMON_APT_DIR:-$HOME/.cache/acpimon/apt}/$1"; }

papt_opts() { # suite -> one option per line
  local d; d=$(papt_dir "$1")
  printf '%s\n' -o "Dir::Etc::sourcelist=$d/sources.list" -o Dir::Etc::sourceparts=- \
    -o "Dir::State::Lists=$d/lists" -o "Dir::Cache=$d/cache" -o "Dir::State::status=$d/status" \
    -o "Dir::Etc::preferences=$d/preferences" -o "Dir::Etc::preferencesparts=$d/preferences.d" \
    -o Acquire::Languages=none -o APT::Get::List-Cleanup=1
  # apt drops to the _apt user for downloads when run as root; it cannot reach a cache under
  # /root, and these files are the caller's own anyway.
  if [ "$(id -u)" -eq 0 ]; then printf '%s\n' -o APT::Sandbox::User=root; fi
}

papt_cache() { local s=$1; shift; local o; mapfile -t o < <(papt_opts "$s"); apt-cache "${o[@]}" "$@"; }
papt_get() { local s=$1; shift; local o; mapfile -t o < <(papt_opts "$s"); apt-get "${o[@]}" "$@"; }

papt_update() { # suite
  papt_log "apt-get update for $1 (private configuration in $(papt_dir "$1"))"
  papt_get "$1" update -qq >&2 ||
    papt_die "apt-get update for $1 failed; the sources tried are in $(papt_dir "$1")/sources.list (derived from the machine's apt sources). A suite without a Release file there is not on the machine's mirror (old releases move to Debian's archive, which these sources do not reach)"
  touch "$(papt_dir "$1")/updated"
}

# The keyring that verifies the suite: the machine's archive keyring (it carries the keys of
# the previous and next releases as well).
papt_keyring() {
  local k
  for k in /usr/share/keyrings/debian-archive-keyring.gpg /usr/share/keyrings/debian-archive-keyring.pgp; do
    [ -f "$k" ] && { echo "$k"; return; }
  done
  papt_die "no Debian archive keyring in /usr/share/keyrings (apt-get install debian-archive-keyring)"
}

papt_setup() { # suite
  local suite=$1 d main sec want age
  command -v apt-get >/dev/null 2>&1 || papt_die "'apt-get' is missing; this needs a Debian machine with apt"
  d=$(papt_dir "$suite")
  main=$(archive_uri)
  [ -n "$main" ] || papt_die "cannot find the machine's Debian archive ($(host_codename) main) in /etc/apt/sources.list or /etc/apt/sources.list.d/ to derive a source for $suite from"
  sec=$(archive_uri security)
  local key; key=$(papt_keyring)
  want="deb [signed-by=$key] $main $suite main
deb [signed-by=$key] $main $suite-updates main"
  [ -z "$sec" ] || want="$want
deb [signed-by=$key] $sec $suite-security main"
  mkdir -p "$d/lists/partial" "$d/cache/archives/partial" "$d/preferences.d"
  : >>"$d/status"
  : >>"$d/preferences"
  if [ "$(cat "$d/sources.list" 2>/dev/null)" != "$want" ]; then
    printf '%s\n' "$want" >"$d/sources.list"
    rm -f "$d/updated"
  fi
  age=${ACPIMON_APT_MAX_AGE_DAYS:-7}
  if [ ! -f "$d/updated" ] || [ -n "$(find "$d/updated" -mtime +"$age" 2>/dev/null)" ]; then
    papt_update "$suite"
  fi
}

papt_fingerprint() {
  local d; d=$(papt_dir "$1")
  stat -c '%n %s %Y' "$d"/lists/*_Packages* "$d/sources.list" 2>/dev/null | sha256sum | cut -c1-16
}

# Highest version of a package whose version matches an extended regex, leaving out backports.
papt_best() { # suite package regex
  papt_cache "$1" madison "$2" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' |
    grep -E "$3" | grep -v '~bpo' | max_version
}

# Downloads pkg=ver... into dir (which must exist); apt-get's messages go to stderr.
papt_download() { # suite dir pkg=ver...
  local s=$1 dir=$2; shift 2
  (cd "$dir" && papt_get "$s" download -q "$@" >&2)
}
