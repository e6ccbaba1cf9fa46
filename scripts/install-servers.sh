#!/usr/bin/env bash
# Install the real servers greenleader's tests run against (Debian bookworm, as root):
#   etcd (etcd-server, etcd-client from bookworm), ZooKeeper (zookeeper from bookworm),
#   Consul (consul from bullseye, pinned at priority 100 so nothing else comes from there),
#   PostgreSQL and PgBouncer (postgresql, pgbouncer from bookworm; tests run initdb, postgres and
#   pgbouncer themselves).
# The packaged services are kept from starting: tests run their own servers on free ports.
# Idempotent; when everything is installed it only checks and exits.
set -euo pipefail

PACKAGES=(etcd-server etcd-client zookeeper consul postgresql pgbouncer)
SERVICES=(etcd zookeeper consul postgresql pgbouncer)
SOURCES=/etc/apt/sources.list.d/debian-bullseye.sources
PIN=/etc/apt/preferences.d/debian-bullseye-pin

log() { echo "install-servers: $*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root"
    exit 1
fi

# write_if_changed FILE: stdin -> FILE, returns 0 if FILE changed.
write_if_changed() {
    local file=$1 new
    new=$(cat)
    if [[ -f $file && "$(cat "$file")" == "$new" ]]; then
        return 1
    fi
    printf '%s\n' "$new" >"$file"
    log "wrote $file"
}

# Same style as this machine's /etc/apt/sources.list.d/debian.sources (deb822, deb.debian.org).
sources_changed=0
write_if_changed "$SOURCES" <<'SRC' && sources_changed=1
# Debian bullseye, only for consul (not in bookworm); see debian-bullseye-pin.
Types: deb
URIs: http://deb.debian.org/debian
Suites: bullseye
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC

write_if_changed "$PIN" <<'PINS' || true
# Never prefer bullseye packages over bookworm ones; consul is installed from here explicitly.
Package: *
Pin: release n=bullseye
Pin-Priority: 100
PINS

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    # Forbid service starts during installation unless a policy already exists (e.g. Docker's).
    own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    log "installing: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    if ((own_policy)); then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
elif ((sources_changed)); then
    apt-get update -q
fi

# Make sure the packaged daemons are neither running nor enabled at boot.
for svc in "${SERVICES[@]}"; do
    if [[ -x /etc/init.d/$svc ]]; then
        if service "$svc" status >/dev/null 2>&1; then
            log "stopping packaged service $svc"
            service "$svc" stop >/dev/null 2>&1 || true
        fi
        update-rc.d "$svc" disable >/dev/null 2>&1 || true
    fi
    if [[ -e /lib/systemd/system/$svc.service ]] && command -v systemctl >/dev/null; then
        if [[ -d /run/systemd/system ]]; then
            systemctl stop "$svc" >/dev/null 2>&1 || true
        fi
        if systemctl is-enabled "$svc" >/dev/null 2>&1; then
            systemctl disable "$svc" >/dev/null 2>&1 || true
        fi
    fi
done

# Verify.
etcd --version | sed -n 1p
etcdctl version | sed -n 1p
consul version | sed -n 1p
if ! compgen -G '/usr/share/java/zookeeper*.jar' >/dev/null; then
    log "ZooKeeper jars missing from /usr/share/java"
    exit 1
fi
ls /usr/share/java/zookeeper*.jar | sed -n 1p
if ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
    log "PostgreSQL server binaries missing from /usr/lib/postgresql/*/bin"
    exit 1
fi
ls /usr/lib/postgresql/*/bin/postgres | sed -n 1p
pgbouncer --version | sed -n 1p
log "ok"
